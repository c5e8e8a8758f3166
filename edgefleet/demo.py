"""``edgefleet demo``: train a digits classifier and a smaller fallback, bundle them, serve them.

The bundles are built once into the work directory and reused on later runs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np
import orjson

from protocol.bundle import bundle_filename

__all__ = ["build_demo_bundles", "demo"]

PRIMARY = ("digits", "2.0.0")
FALLBACK = ("digits-small", "1.0.0")


def _export_sklearn(model: object, sample: np.ndarray, out: Path) -> Path:
    from exporters.sources import load_source

    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        return load_source("sklearn", model, sample, Path(work)).onnx_path.replace(out)


def build_demo_bundles(work_dir: Path) -> tuple[Path, Path]:
    """Train both models on scikit-learn's bundled digits data and bundle them (cached)."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    from exporters.package import create_bundle

    work_dir.mkdir(parents=True, exist_ok=True)
    primary = work_dir / bundle_filename(*PRIMARY)
    fallback = work_dir / bundle_filename(*FALLBACK)
    if primary.exists() and fallback.exists():
        return primary, fallback
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target
    with click.progressbar(length=4, label="building demo bundles") as bar:
        mlp = MLPClassifier(
            hidden_layer_sizes=(64,), early_stopping=True, max_iter=200, random_state=0
        ).fit(x, y)
        bar.update(1)
        small = LogisticRegression(max_iter=500).fit(x, y)
        bar.update(1)
        create_bundle(
            _export_sklearn(small, x, work_dir / "digits-small.onnx"),
            name=FALLBACK[0],
            version=FALLBACK[1],
            out=fallback,
            max_batch=64,
        )
        bar.update(1)
        create_bundle(
            _export_sklearn(mlp, x, work_dir / "digits.onnx"),
            name=PRIMARY[0],
            version=PRIMARY[1],
            out=primary,
            fallback=f"{FALLBACK[0]}@{FALLBACK[1]}",
            max_batch=64,
        )
        bar.update(1)
    (work_dir / "request.json").write_bytes(
        orjson.dumps(
            {
                "inputs": [
                    {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x[0].tolist()}
                ]
            }
        )
    )
    return primary, fallback


@click.command("demo")
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path),
    default=Path(".demo"),
    show_default=True,
    help="Where the demo bundles and agent state live.",
)
@click.option("--port", type=int, default=8470, show_default=True, help="The agent's TCP port.")
def demo(work_dir: Path, port: int) -> None:
    """Build the demo bundles (once) and serve them with the agent.

    \b
    digits@2.0.0        a small neural network trained on scikit-learn's digits
    digits-small@1.0.0  a logistic regression, pinned as its fallback
    """
    from edgefleet.cli_agent import serve_command

    primary, fallback = build_demo_bundles(work_dir)
    request = work_dir / "request.json"
    click.echo(
        "\nTry it (one handwritten 0 from the digits data):\n"
        f"  curl -s -d @{request} localhost:{port}/v2/models/digits/infer\n"
        f"  curl -s --unix-socket {work_dir / 'agent.sock'} "
        f"-d @{request} http://agent/v2/models/digits/infer\n"
        f"  edgefleet agent status --url http://127.0.0.1:{port}\n",
        err=True,
    )
    ctx = click.get_current_context()
    ctx.invoke(
        serve_command,
        bundles=(primary,),
        fallback=fallback,
        port=port,
        state_dir=work_dir / "state",
        socket=work_dir / "agent.sock",
    )
