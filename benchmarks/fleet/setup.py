"""What the fleet benchmark stands on: a Mosquitto on loopback, two real digits bundles, and a
fleet home with keys and both bundles published — all made with the project's own commands.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = [
    "BROKER_LIMITS",
    "Mosquitto",
    "build_bundles",
    "edgefleet",
    "free_port",
    "init_fleet_home",
]

BIN = Path(sys.executable).parent

# A production broker for a fleet of this size raises Mosquitto's per-client defaults (20
# messages in flight, 1000 queued): the fleet service alone receives three QoS 1 messages per
# device in a wave, and the packaged config already queues 200000 for its persistent session.
BROKER_LIMITS = {
    "max_inflight_messages": 1000,
    "max_queued_messages": 200000,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mosquitto() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if found is None:
        raise SystemExit("mosquitto is not installed: apt-get install mosquitto")
    return found


@dataclass
class Mosquitto:
    """A plain (loopback, anonymous, no persistence) Mosquitto on a free port."""

    directory: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> Mosquitto:  # seconds
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        conf = self.directory / "mosquitto.conf"
        limits = "".join(f"{k} {v}\n" for k, v in BROKER_LIMITS.items())
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"{limits}log_dest stderr\nlog_type error\nlog_type warning\n"
        )
        log = (self.directory / "mosquitto.log").open("ab")
        self.process = subprocess.Popen([_mosquitto(), "-c", str(conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                time.sleep(0.05)
            else:
                return self
        self.stop()
        raise SystemExit(f"mosquitto did not listen on {self.port}; see {log.name}")

    @property
    def version(self) -> str:
        shown = subprocess.run([_mosquitto(), "-h"], capture_output=True, text=True, check=False)
        return (shown.stdout.splitlines() or ["?"])[0]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=10)
        self.process = None


def build_bundles(out: Path) -> dict[str, Path]:
    """``digits`` 1.0.0 (a logistic regression) and 2.0.0 (a small MLP), both trained on
    scikit-learn's bundled digits, exported and bundled by the project's exporters."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    from exporters.package import create_bundle
    from exporters.sources import load_source
    from protocol.bundle import bundle_filename

    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target
    trained = {
        "1.0.0": LogisticRegression(max_iter=500).fit(x, y),
        "2.0.0": MLPClassifier(
            hidden_layer_sizes=(32,), early_stopping=True, max_iter=200, random_state=0
        ).fit(x, y),
    }
    bundles = {}
    for version, model in trained.items():
        with tempfile.TemporaryDirectory(dir=out) as work:
            onnx_path = load_source("sklearn", model, x, Path(work)).onnx_path
            target = out / bundle_filename("digits", version)
            create_bundle(onnx_path, name="digits", version=version, out=target, max_batch=16)
        bundles[version] = target
    return bundles


def edgefleet(home: Path, *args: str) -> str:
    """Run ``edgefleet fleet --home HOME ARGS``; stop the benchmark with its output on failure."""
    done = subprocess.run(
        [str(BIN / "edgefleet"), "fleet", "--home", str(home), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"edgefleet fleet {' '.join(args)} failed:\n{done.stderr}{done.stdout}")
    return done.stdout


def init_fleet_home(home: Path, bundles: dict[str, Path], broker_url: str) -> Path:
    """``fleet keys init`` and ``fleet publish`` of every bundle; returns the director's public
    key as a PEM file the simulated devices read (a real device gets it at enrollment)."""
    from fleet.trust.enroll_http import load_director_key
    from fleet.trust.settings import FleetTrustSettings

    edgefleet(home, "keys", "init", "--broker-host", "127.0.0.1")
    settings = FleetTrustSettings(home=home, broker_url=broker_url)
    for bundle in bundles.values():
        edgefleet(home, "publish", str(bundle), "--targets-key", str(settings.key_path("targets")))
    public = load_director_key(settings.director_key).public_key()
    path = home / "director.pub.pem"
    path.write_bytes(public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return path
