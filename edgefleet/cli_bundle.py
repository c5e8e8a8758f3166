"""``edgefleet bundle``: create a bundle from a model file, inspect it, verify it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from agent.runtimes import RUNTIMES
from edgefleet.cli_errors import reported
from protocol.bundle import file_digest, read_manifest, verify_bundle
from protocol.manifest import Manifest, TensorSpec

__all__ = ["bundle"]


@click.group()
def bundle() -> None:
    """Create, inspect and verify model bundles (.efb files).

    \b
    A bundle is one file, <name>-<version>.efb, holding manifest.json and the
    model files; every file is listed with its sha256 and size.

    \b
    Examples:
      edgefleet bundle create --model digits.onnx --name digits --version 2.0.0 --out dist/
      edgefleet bundle inspect dist/digits-2.0.0.efb
      edgefleet bundle verify dist/digits-2.0.0.efb
    """


@bundle.command("create")
@click.option(
    "--model",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Model file: .onnx, OpenVINO IR .xml (with its .bin beside it) or .tflite.",
)
@click.option("--name", required=True, help="Model name: lowercase letters, digits, '.', '_', '-'.")
@click.option("--version", required=True, help="Semantic version, e.g. 2.0.0 or 2.1.0-rc.1.")
@click.option(
    "--out",
    required=True,
    type=click.Path(),
    help="Bundle file to write, or a folder to write <name>-<version>.efb into "
    "(a path ending in / is created as a folder).",
)
@click.option(
    "--runtime",
    type=click.Choice(RUNTIMES),
    help="Runtime that loads the model [default: from the file suffix].",
)
@click.option(
    "--fallback",
    metavar="NAME@VERSION",
    help="Model that answers when this one cannot, e.g. digits-small@1.0.0.",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Largest batch; above 1 every input needs a dynamic first dimension.",
)
@click.option(
    "--device",
    "devices",
    multiple=True,
    metavar="DEVICE",
    help="Preferred device, best first; repeat it (e.g. --device NPU --device CPU) [default: CPU].",
)
@click.option(
    "--golden-cases",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Self-test cases recorded from the model's own outputs.",
)
@reported
def create_command(
    model: Path,
    name: str,
    version: str,
    out: str,
    runtime: str | None,
    fallback: str | None,
    max_batch: int,
    devices: tuple[str, ...],
    golden_cases: int,
) -> None:
    """Package a model file as a bundle.

    The model is loaded on the CPU to read its inputs and outputs, and run on
    generated inputs to record golden self-test cases that every device checks
    before it serves the model.

    \b
    Examples:
      edgefleet bundle create --model digits.onnx --name digits --version 2.0.0 --out dist/
      edgefleet bundle create --model model.xml --name resnet --version 1.0.0 \\
          --device NPU --device GPU --device CPU --out resnet-1.0.0.efb
      edgefleet bundle create --model digits.onnx --name digits --version 2.1.0 \\
          --max-batch 64 --fallback digits-small@1.0.0 --out dist/
    """
    # Imported here: the exporters load runtimes, which `inspect` and `verify` do not need.
    from exporters.package import bundle_path, create_bundle

    if out.endswith(("/", os.sep)):
        Path(out).mkdir(parents=True, exist_ok=True)
    target = bundle_path(Path(out), name, version)
    manifest = create_bundle(
        model,
        name=name,
        version=version,
        out=target,
        runtime=runtime,
        fallback=fallback,
        max_batch=max_batch,
        preferred_devices=devices or ("CPU",),
        golden_cases=golden_cases,
    )
    click.echo(f"wrote {target}")
    click.echo(f"  {manifest.name}@{manifest.version}  runtime {manifest.runtime}")
    click.echo(f"  sha256 {file_digest(target)}")
    click.echo(f"next: edgefleet bundle inspect {target}")


@bundle.command("inspect")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print manifest.json instead of a summary.")
@reported
def inspect_command(file: Path, as_json: bool) -> None:
    """Show what a bundle holds, from its manifest, without checking the model files.

    \b
    Examples:
      edgefleet bundle inspect digits-2.0.0.efb
      edgefleet bundle inspect digits-2.0.0.efb --json | jq .inputs

    Run `edgefleet bundle verify` to check every file against its sha256.
    """
    manifest = read_manifest(file)
    if as_json:
        click.echo(json.dumps(json.loads(manifest.to_json()), indent=2))
        return
    click.echo(_summary(manifest, file_digest(file)))


@bundle.command("verify")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@reported
def verify_command(file: Path) -> None:
    """Check every member of a bundle against its manifest (names, types, sizes, sha256).

    Nothing is written to disk. Exits 0 and prints the bundle's sha256 when it is
    sound; exits 1 naming the member at fault otherwise.

    \b
    Example:
      edgefleet bundle verify digits-2.0.0.efb
    """
    manifest = verify_bundle(file)
    count = len(manifest.files)
    files = f"{count} file" if count == 1 else f"{count} files"
    click.echo(f"OK {file.name}: {manifest.name}@{manifest.version}, {files}")
    click.echo(f"sha256 {file_digest(file)}")


def _summary(m: Manifest, digest: str) -> str:
    lines = [
        f"bundle     {m.name}@{m.version}",
        f"sha256     {digest}",
        f"runtime    {m.runtime} (model file {m.model_file})",
        f"devices    {', '.join(m.preferred_devices)}",
        f"created    {m.created.isoformat()} by {m.producer} (agent >= {m.min_agent_version})",
        f"batching   max batch {m.max_batch_size}, "
        + ("batchable on dim 0" if m.batchable else "not batchable"),
        f"quantized  {_quantization(m)}",
        f"golden     {len(m.golden.cases)} cases (rtol {m.golden.rtol}, atol {m.golden.atol})",
        f"fallback   {m.fallback or 'none'}",
        f"drift      {_drift(m)}",
        "files",
    ]
    width = max(len(f.path) for f in m.files)
    lines += [f"  {f.path:<{width}}  {f.size:>12,} B  {f.sha256[:16]}…" for f in m.files]
    lines += _tensors(m.inputs, m.outputs)
    return "\n".join(lines)


def _quantization(m: Manifest) -> str:
    parity = m.quantization.parity
    if parity is None:
        return m.quantization.method
    numbers = {
        "samples": parity.samples,
        "max abs diff": parity.max_abs_diff,
        "top-1 agreement": parity.top1_agreement,
        "accuracy": parity.exported_accuracy,
    }
    shown = ", ".join(f"{k} {v:.4g}" for k, v in numbers.items() if v is not None)
    return f"{m.quantization.method} (parity: {shown})"


def _drift(m: Manifest) -> str:
    if m.drift is None:
        return "no profile"
    return (
        f"{len(m.drift.features)} features, {len(m.drift.outputs)} outputs "
        f"(PSI warn {m.drift.psi_warn}, alert {m.drift.psi_alert})"
    )


def _tensors(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> list[str]:
    rows = [("input", s) for s in inputs] + [("output", s) for s in outputs]
    width = max(len(s.name) for _, s in rows)
    lines = ["tensors"]
    lines += [
        f"  {kind:<6}  {s.name:<{width}}  {s.datatype:<5}  {list(s.shape)}" for kind, s in rows
    ]
    return lines
