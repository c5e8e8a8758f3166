"""``edgefleet bundle``: create -> inspect -> verify, and refusals as one clean error line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from edgefleet.cli_bundle import bundle
from protocol.manifest import (
    Manifest,
)
from tests.fleet.api_support import quantized_bundle
from tests.models import mlp_onnx


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(bundle, [str(a) for a in args])


@pytest.fixture
def created(tmp_path: Path) -> Path:
    model = mlp_onnx(tmp_path / "mlp.onnx")
    dist = tmp_path / "dist"
    result = run(
        "create", "--model", model, "--name", "digits", "--version", "2.0.0",
        "--max-batch", "16", "--device", "GPU", "--device", "CPU",
        "--fallback", "digits-small@1.0.0", "--out", f"{dist}/",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    path = dist / "digits-2.0.0.efb"
    assert f"wrote {path}" in result.stdout
    assert hashlib.sha256(path.read_bytes()).hexdigest() in result.stdout
    return path


def test_create_inspect_verify_round_trip(created: Path) -> None:
    digest = hashlib.sha256(created.read_bytes()).hexdigest()

    inspected = run("inspect", created)
    assert inspected.exit_code == 0, inspected.output
    text = inspected.stdout
    for expected in (
        "digits@2.0.0",
        digest,
        "onnxruntime (model file mlp.onnx)",
        "GPU, CPU",
        "max batch 16, batchable on dim 0",
        "2 cases",
        "fallback   digits-small@1.0.0",
        f"mlp.onnx  {created.parent.parent.joinpath('mlp.onnx').stat().st_size:>12,} B",
        "input   input   FP32   [-1, 64]",
        "output  logits  FP32   [-1, 10]",
        "output  label   INT64  [-1]",
    ):
        assert expected in text, f"{expected!r} missing from:\n{text}"

    as_json = run("inspect", created, "--json")
    assert as_json.exit_code == 0
    manifest = Manifest.model_validate(json.loads(as_json.stdout))
    assert (manifest.name, manifest.version, manifest.max_batch_size) == ("digits", "2.0.0", 16)
    assert manifest.preferred_devices == ("GPU", "CPU")

    verified = run("verify", created)
    assert verified.exit_code == 0, verified.output
    assert verified.stdout.startswith("OK digits-2.0.0.efb: digits@2.0.0, 1 file\n")
    assert f"sha256 {digest}" in verified.stdout


def test_tampered_bundle_fails_verify(created: Path) -> None:
    model = (created.parent.parent / "mlp.onnx").read_bytes()
    data = bytearray(created.read_bytes())
    at = data.index(model) + len(model) // 2
    data[at] ^= 0x01
    created.write_bytes(bytes(data))

    result = run("verify", created)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: digits-2.0.0.efb: member 'mlp.onnx' fails its sha256")
    assert "Traceback" not in result.output
    # inspect reads only the manifest, so it still works: verify is the check.
    assert run("inspect", created).exit_code == 0


def test_create_refusals_are_one_error_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model at all")
    result = run("create", "--model", junk, "--name", "junk", "--version", "1.0.0",
                 "--out", tmp_path)  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: onnxruntime cannot load {junk}")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "junk-1.0.0.efb").exists()

    fixed = mlp_onnx(tmp_path / "fixed.onnx", batch_dynamic=False)
    result = run("create", "--model", fixed, "--name", "fixed", "--version", "1.0.0",
                 "--max-batch", "8", "--out", tmp_path)  # fmt: skip
    assert result.exit_code == 1
    assert "input 'input'" in result.stderr
    assert "dynamic first dimension" in result.stderr

    result = run("create", "--model", fixed, "--name", "Fixed", "--version", "1.0.0",
                 "--out", tmp_path)  # fmt: skip
    assert result.exit_code == 1
    assert "not a valid model name" in result.stderr


def test_out_may_name_the_file(tmp_path: Path) -> None:
    model = mlp_onnx(tmp_path / "mlp.onnx")
    out = tmp_path / "custom.efb"
    result = run("create", "--model", model, "--name", "m", "--version", "1.0.0", "--out", out)
    assert result.exit_code == 0, result.output
    assert run("verify", out).exit_code == 0
    # Without a trailing slash, a path that is neither a folder nor a .efb file is refused.
    result = run("create", "--model", model, "--name", "m", "--version", "1.0.0",
                 "--out", tmp_path / "nowhere")  # fmt: skip
    assert result.exit_code == 1
    assert "does not end in .efb; name it m-1.0.0.efb" in result.stderr
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_not_a_bundle(tmp_path: Path, command: str) -> None:
    fake = tmp_path / "fake.efb"
    fake.write_bytes(b"hello")
    result = run(command, fake)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: fake.efb is not a bundle")
    missing = run(command, tmp_path / "missing.efb")
    assert missing.exit_code == 1
    assert "cannot read bundle" in missing.stderr


def test_help_teaches_with_examples() -> None:
    for args in ([], ["create"], ["inspect"], ["verify"]):
        result = run(*args, "--help")
        assert result.exit_code == 0
        assert "Example" in result.stdout
    assert "edgefleet bundle create --model digits.onnx" in run("create", "--help").stdout


def test_inspect_shows_quantization_parity_and_drift(tmp_path: Path) -> None:
    path = quantized_bundle(tmp_path, name="digits")
    text = run("inspect", path).stdout
    assert "dynamic-int8 (parity: samples 500, max abs diff 0.0123, top-1 agreement 0.996)" in text
    assert "1 features, 0 outputs (PSI warn 0.1, alert 0.3)" in text


def test_create_reports_a_filesystem_error(tmp_path: Path) -> None:
    model = mlp_onnx(tmp_path / "mlp.onnx")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run("create", "--model", model, "--name", "m", "--version", "1.0.0",
                 "--out", blocker / "m.efb")  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {blocker}")
    assert "Traceback" not in result.output
