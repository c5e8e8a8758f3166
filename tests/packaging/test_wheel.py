"""The distributions: the sdist holds what a rebuild needs (the wheel here is built from it, not
from the tree), the wheel holds the packages and their data files and nothing else, and the
wheel installed into a fresh virtual environment serves a bundle with ``edgefleet agent serve``
from a directory far from the source tree, with no PYTHONPATH."""

from __future__ import annotations

import email
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import tomllib

from tests.mqtt_support import free_port
from tests.packaging.commands import ROOT

pytestmark = pytest.mark.slow

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGES = [p.rstrip("*") for p in PROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]


def source_files() -> set[str]:
    """Every file the packages hold in the tree: modules and data, caches aside."""
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                found.add(path.relative_to(ROOT).as_posix())
    return found


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The sdist built from the tree, and the wheel built from the sdist."""
    out = tmp_path_factory.mktemp("dist")
    build = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    made = subprocess.run([sys.executable, "-c", build, str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert made.returncode == 0, made.stderr
    sdist = out / made.stdout.strip().splitlines()[-1]
    wheel_dir = out / "wheel"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheel_dir), str(sdist)],
        cwd=out, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = wheel_dir.glob("edgefleet-*.whl")
    return sdist, wheel


def test_the_sdist_holds_what_a_rebuild_needs(dists: tuple[Path, Path]) -> None:
    sdist, _ = dists
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {"pyproject.toml", PROJECT["project"]["readme"], *source_files()}
    assert needed <= names, f"missing from the sdist: {sorted(needed - names)[:10]}"
    assert not any(n.startswith((".venv/", ".git/", "build/")) for n in names)


def test_the_wheel_holds_the_packages_their_data_and_nothing_else(
    dists: tuple[Path, Path],
) -> None:
    _, wheel = dists
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(archive.read(info))
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    packaged = {n for n in names if ".dist-info/" not in n}
    assert packaged == source_files(), (
        f"in the tree, not the wheel: {sorted(source_files() - packaged)[:10]}; "
        f"in the wheel, not the tree: {sorted(packaged - source_files())[:10]}"
    )
    assert not any(n.startswith(("tests/", "benchmarks/", "docs/", "packaging/")) for n in names)
    # The console's static files are read at run time: they must be in it.
    assets = {n for n in packaged if n.startswith("fleet/console/assets/")}
    assert {"fleet/console/assets/index.html"} <= assets and any(n.endswith(".js") for n in assets)
    assert "edgefleet = edgefleet.cli:main" in entry_points
    requires = metadata.get_all("Requires-Dist") or []
    base = [r for r in requires if "extra ==" not in r]
    assert len(base) == len(PROJECT["project"]["dependencies"])
    assert metadata["Version"] == PROJECT["project"]["version"]


# pip fetches the dependencies (from its cache when warm, ~25 s here; longer when cold).
@pytest.mark.timeout(600)
def test_the_installed_wheel_serves_a_bundle_away_from_the_source_tree(
    dists: tuple[Path, Path], bundles: dict[str, Path], tmp_path: Path
) -> None:
    _, wheel = dists
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # The base install: the agent with ONNX Runtime, the versions of constraints.txt.
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"),
         str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-3000:]

    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(away), "LANG": "C.UTF-8"}
    where = subprocess.run(
        [str(python), "-c", "import agent, fleet.console as c; print(agent.__file__); "
         "print(sorted(p.name for p in c.ASSETS.iterdir()))"],
        cwd=away, env=env, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    module, assets = where.stdout.splitlines()
    assert module.startswith(str(venv)) and "index.html" in assets

    port = free_port()
    log = tmp_path / "agent.log"
    argv = [str(venv / "bin" / "edgefleet"), "agent", "serve", "--bundle", str(bundles["mlp-1"]),
            "--port", str(port), "--state-dir", str(away / "state"),
            "--socket", str(away / "a.sock")]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=away, env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"not ready:\n{log.read_text()}"
            time.sleep(0.05)
        body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                            "data": [0.25] * 64}]}  # fmt: skip
        answer = httpx.post(f"{url}/v2/models/mlp/infer", json=body, timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_name"] == "mlp" and answer.json()["model_version"] == "1.0.0"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    assert process.returncode == 0, log.read_text()
