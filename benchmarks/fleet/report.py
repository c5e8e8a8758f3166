"""From what the fleet and the simulated devices recorded to the benchmark's numbers and its
Markdown tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np

__all__ = ["AWS_IOT_JOBS_PER_MINUTE", "TARGETS", "markdown", "median_rounds", "rollout_metrics"]

# AWS IoT Jobs (and Greengrass v2 deployments, which run on it): the rollout configuration's
# maximumPerMinute, "the maximum number of things that will be notified of a pending job, per
# minute", is at most 1000.
AWS_IOT_JOBS_PER_MINUTE = 1000
TARGETS = {"wave_p95_s": 5.0, "rollout_s": 60.0, "devices": 10_000}


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    array = np.asarray(values)
    return {
        "p50": round(float(np.percentile(array, 50)), 3),
        "p95": round(float(np.percentile(array, 95)), 3),
        "max": round(float(array.max()), 3),
    }


def rollout_metrics(view: Mapping[str, Any], records: Mapping[str, Any]) -> dict[str, Any]:
    """Per-wave delivery and commit latencies from the wave's start, and the rollout's times.

    ``view`` is ``GET /rollouts/{id}`` after it finished; ``records`` maps device id to what the
    simulator recorded for it (``DeviceRecord`` as a dict).
    """
    rollout_id = view["id"]
    created = _ts(view["created_at"]) or 0.0
    ended = _ts(view["updated_at"]) or created
    members: dict[int, list[str]] = {}
    for assignment in view["devices"]:
        members.setdefault(assignment["wave"], []).append(assignment["device"])
    waves = []
    for wave in view["waves"]:
        started = _ts(wave["started_at"])
        finished = _ts(wave["finished_at"])
        delivered: list[float] = []
        committed: list[float] = []
        missing = 0
        for device in members.get(wave["index"], []):
            found = [
                d
                for d in records.get(device, {}).get("deliveries", [])
                if d["rollout_id"] == rollout_id
            ]
            if not found or started is None:
                missing += 1
                continue
            delivered.append(found[0]["received"] - started)
            if found[0]["committed"] is not None:
                committed.append(found[0]["committed"] - started)
        waves.append(
            {
                "index": wave["index"],
                "percent": wave["percent"],
                "state": wave["state"],
                "devices": len(members.get(wave["index"], [])),
                "delivered": len(delivered),
                "not_delivered": missing,
                "delivery_s": _stats(delivered),
                "all_committed_s": round(max(committed), 3) if committed else None,
                "committed": len(committed),
                "fleet_wave_s": (
                    round(finished - started, 3) if finished is not None and started else None
                ),
                "started_after_create_s": round(started - created, 3) if started else None,
                "counts": wave["counts"],
            }
        )
    devices = len(view["devices"])
    seconds = ended - created
    per_minute = devices / seconds * 60 if seconds > 0 else None
    return {
        "id": rollout_id,
        "version": view["version"],
        "state": view["state"],
        "reason": view.get("reason"),
        "devices": devices,
        "waves": waves,
        "control_plane_s": round(seconds, 3),
        "devices_per_minute": round(per_minute, 1) if per_minute else None,
        "aws_iot_jobs_ratio": (
            round(per_minute / AWS_IOT_JOBS_PER_MINUTE, 2) if per_minute else None
        ),
        "policy": view["policy"],
    }


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def median_rounds(run: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per rollout kind (staged, one wave), the round with the median control-plane time, with
    every round's control-plane time and worst wave p95 under ``all_rounds``."""
    kinds: dict[str, list[dict[str, Any]]] = {}
    for rollout in run["rollouts"]:
        kinds.setdefault(rollout["label"], []).append(rollout)
    chosen = []
    for rounds in kinds.values():
        ordered = sorted(rounds, key=lambda r: r["control_plane_s"])
        median = dict(ordered[(len(ordered) - 1) // 2])
        median["all_rounds"] = [
            {"control_plane_s": r["control_plane_s"], "worst_p95_s": _worst_p95(r)} for r in rounds
        ]
        chosen.append(median)
    return chosen


def _worst_p95(rollout: Mapping[str, Any]) -> float | None:
    values = [w["delivery_s"]["p95"] for w in rollout["waves"]]
    return None if None in values or not values else max(values)


def markdown(results: Mapping[str, Any]) -> str:
    """The tables for RESULTS.md (median round of each kind): per wave, per rollout, targets."""
    lines = [
        "| devices | rollout | wave | devices in wave | delivered p50 s | p95 s | max s "
        "| all committed s | wave done (fleet) s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in results["runs"]:
        for rollout in median_rounds(run):
            label = f"{rollout['label']} → {rollout['version']}"
            for wave in rollout["waves"]:
                d = wave["delivery_s"]
                lines.append(
                    f"| {run['devices']:,} | {label} | {wave['index'] + 1} ({wave['percent']:g}%)"
                    f" | {wave['devices']:,} | {_f(d['p50'])} | {_f(d['p95'])} | {_f(d['max'])}"
                    f" | {_f(wave['all_committed_s'])} | {_f(wave['fleet_wave_s'])} |"
                )
    lines += [
        "",
        "| devices | rollout | state | control-plane s | devices/min | × AWS IoT Jobs "
        "(1,000/min) | fleet CPU s | fleet peak RSS MiB | simulators CPU s (verify) "
        "| broker CPU s | every round: control-plane s / worst p95 s |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in results["runs"]:
        for rollout in median_rounds(run):
            r = rollout["resources"]
            rounds = ", ".join(
                f"{_f(x['control_plane_s'], 1)} / {_f(x['worst_p95_s'], 1)}"
                for x in rollout["all_rounds"]
            )
            lines.append(
                f"| {run['devices']:,} | {rollout['label']} | {rollout['state']}"
                f" | {_f(rollout['control_plane_s'])} | {_f(rollout['devices_per_minute'], 0)}"
                f" | {_f(rollout['aws_iot_jobs_ratio'], 1)}× | {_f(r['fleet_cpu_s'])}"
                f" | {_f(r['fleet_peak_rss_mib'], 0)} | {_f(r['sims_cpu_s'], 1)}"
                f" ({_f(r['sims_verify_s'], 1)}) | {_f(r['broker_cpu_s'])} | {rounds} |"
            )
    lines += ["", *_targets(results)]
    return "\n".join(lines)


def _targets(results: Mapping[str, Any]) -> list[str]:
    runs = [r for r in results["runs"] if r["devices"] >= TARGETS["devices"]]
    if not runs:
        return [f"(targets are judged at {TARGETS['devices']:,} devices; none were run)"]
    lines = ["| target (median round) | verdict | measured |", "|---|---|---|"]
    for run in runs:
        chosen = median_rounds(run)
        for rollout in chosen:
            worst = _worst_p95(rollout)
            verdict = "met" if worst is not None and worst < TARGETS["wave_p95_s"] else "not met"
            lines.append(
                f"| every wave's delivery p95 < {TARGETS['wave_p95_s']:g} s "
                f"({rollout['label']}) | {verdict} | worst wave p95 {_f(worst)} s |"
            )
        staged = chosen[0]
        seconds = staged["control_plane_s"]
        verdict = "met" if seconds < TARGETS["rollout_s"] else "not met"
        lines.append(
            f"| whole {run['devices']:,}-device rollout < {TARGETS['rollout_s']:g} s "
            f"({staged['label']}) | {verdict} | {_f(seconds)} s |"
        )
    return lines
