"""The benchmark's verdicts against its targets, and the Markdown report."""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate", "markdown"]

MIB_TO_MB = 1.048576


def _find(results: dict[str, Any], model: str, system: str, transport: str, c: int) -> Any:
    for row in results["scenarios"]:
        if (row["model"], row["system"], row["transport"], row["concurrency"]) == (
            model,
            system,
            transport,
            c,
        ):
            return row
    return None


def _target(name: str, met: bool | None, measured: str) -> dict[str, Any]:
    return {"target": name, "met": met, "measured": measured}


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per target: its name, met (None when it could not be measured), the numbers."""
    agent, raw = "edgefleet agent", "onnxruntime (in-process)"
    out = []

    floor = _find(results, "digits", raw, "-", 1)
    for transport in ("HTTP JSON", "HTTP binary"):
        row = _find(results, "digits", agent, transport, 1)
        if row and floor:
            gap = row["p50_ms"] - floor["p50_ms"]
            out.append(
                _target(
                    f"digits c=1 agent {transport} p50 ≤ raw + 0.4 ms and < 0.8 ms",
                    gap <= 0.4 and row["p50_ms"] < 0.8,
                    f"p50 {row['p50_ms']:.3f} ms vs raw {floor['p50_ms']:.3f} ms (+{gap:.3f} ms)",
                )
            )

    for model in ("digits", "resnet50"):
        tcp = _find(results, model, agent, "HTTP binary", 1)
        uds = _find(results, model, agent, "Unix socket binary", 1)
        if tcp and uds:
            out.append(
                _target(
                    f"{model} c=1 Unix socket faster than TCP (binary, p50)",
                    uds["p50_ms"] < tcp["p50_ms"],
                    f"socket {uds['p50_ms']:.3f} ms vs TCP {tcp['p50_ms']:.3f} ms "
                    f"({uds['p50_ms'] / tcp['p50_ms']:.2f}×)",
                )
            )

    for model in ("digits", "resnet50"):
        base = _find(results, model, "FastAPI + onnxruntime", "HTTP JSON", 16)
        for transport in ("HTTP JSON", "HTTP binary"):
            row = _find(results, model, agent, transport, 16)
            if base is None or row is None:
                continue
            if not base["throughput_rps"]:
                out.append(
                    _target(f"{model} c=16 agent {transport} ≥ 3× FastAPI", None, "no answers")
                )
                continue
            ratio = row["throughput_rps"] / base["throughput_rps"]
            out.append(
                _target(
                    f"{model} c=16 agent {transport} throughput ≥ 3× FastAPI baseline (JSON)",
                    ratio >= 3,
                    f"{row['throughput_rps']:.0f} vs {base['throughput_rps']:.0f} req/s "
                    f"({ratio:.2f}×)",
                )
            )
        if base is None and _find(results, model, agent, "HTTP JSON", 16):
            out.append(_target(f"{model} c=16 agent ≥ 3× FastAPI baseline", None, "no baseline"))

    batched = results.get("raw_batched", {}).get("resnet50")
    for transport in ("HTTP binary", "Unix socket binary"):
        row = _find(results, "resnet50", agent, transport, 16)
        if batched and row:
            best_batch, best = max(batched.items(), key=lambda kv: float(kv[1]))
            ratio = row["throughput_rps"] / best
            out.append(
                _target(
                    f"resnet50 c=16 agent {transport} ≥ 90% of raw best batched throughput",
                    ratio >= 0.9,
                    f"{row['throughput_rps']:.2f} vs {best:.2f} img/s at batch {best_batch} "
                    f"({ratio:.0%})",
                )
            )

    res = results["agent"]
    out.append(
        _target(
            "agent idle CPU < 1%",
            res["idle_cpu_percent"] < 1,
            f"{res['idle_cpu_percent']:.2f}% over {res['idle_window_s']:.0f} s",
        )
    )
    out.append(
        _target(
            "agent cold start < 1.5 s (median, fresh store)",
            res["cold_start_median_s"] < 1.5,
            f"{res['cold_start_median_s']:.2f} s (runs {res['cold_start_fresh_store_s']}; "
            f"restart on an installed store {res['restart_median_s']:.2f} s)",
        )
    )
    rss_mb = res["rss_idle_mib"] * MIB_TO_MB
    out.append(
        _target(
            "agent idle RSS < 150 MB (digits loaded)",
            rss_mb < 150,
            f"{rss_mb:.0f} MB ({res['rss_idle_mib']:.0f} MiB)",
        )
    )
    return out


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}" if x < 10 else f"{x:.1f}"


def markdown(results: dict[str, Any]) -> str:
    """The report: one table row per model, system and transport; then targets and resources."""
    lines = [
        "| model | server | transport | c=1 p50 ms | c=1 p99 ms | c=1 req/s "
        "| c=16 p50 ms | c=16 p99 ms | c=16 req/s | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys: list[tuple[str, str, str]] = []
    for row in results["scenarios"]:
        key = (row["model"], row["system"], row["transport"])
        if key not in keys:
            keys.append(key)
    for model, system, transport in keys:
        one = _find(results, model, system, transport, 1) or {}
        many = _find(results, model, system, transport, 16) or {}
        errors = one.get("errors", 0) + many.get("errors", 0)
        lines.append(
            f"| {model} | {system} | {transport} "
            f"| {_ms(one.get('p50_ms'))} | {_ms(one.get('p99_ms'))} "
            f"| {one.get('throughput_rps', 0):.1f} "
            f"| {_ms(many.get('p50_ms'))} | {_ms(many.get('p99_ms'))} "
            f"| {many.get('throughput_rps', 0):.1f} | {errors} |"
        )
    lines.append("")
    for model, rates in results.get("raw_batched", {}).items():
        shown = ", ".join(f"batch {b}: {r:.1f}" for b, r in rates.items())
        lines.append(f"- raw onnxruntime, one caller, {model} rows/s — {shown}")
    res = results["agent"]
    lines.append(
        f"- agent ({res['model']}): cold start median {res['cold_start_median_s']:.2f} s "
        f"(fresh store {res['cold_start_fresh_store_s']}, restart {res['cold_start_restart_s']}), "
        f"idle RSS {res['rss_idle_mib']:.0f} MiB, idle CPU {res['idle_cpu_percent']:.2f}% "
        f"over {res['idle_window_s']:.0f} s"
    )
    for name, reason in results.get("skipped", {}).items():
        lines.append(f"- skipped {name}: {reason}")
    lines += ["", "| target | met | measured |", "|---|---|---|"]
    for t in results["targets"]:
        met = "n/a" if t["met"] is None else "met" if t["met"] else "**not met**"
        lines.append(f"| {t['target']} | {met} | {t['measured']} |")
    return "\n".join(lines)
