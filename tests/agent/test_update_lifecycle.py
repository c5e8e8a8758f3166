"""The update lifecycle with real agents, a real image repository over HTTP and real models:
probation under load commits a good version and rolls back a failing or a slow one by itself;
a return to a known-good version skips it; progress arrives stage by stage; a newer desired
state replaces one in flight; deadlines fire; a desired state settled by crash recovery is
never applied again. The rules probation judges by, and the counters it reads, are tested on
their own first.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from starlette.responses import StreamingResponse

from agent.probation import ProbationPolicy, judge
from agent.settings import AgentSettings
from agent.trust.state import TrustState
from agent.trust.tuf_client import ModelCatalogue
from agent.update import LifecycleConfig
from agent.update.known_good import KNOWN_GOOD_FILE, CommittedVersion, KnownGood
from agent.update.record import RECORD_FILE
from agent.updates import UpdateApplier, UpdateOutcome
from agent.windows import VersionCounter, VersionWindows
from exporters.package import create_bundle
from protocol.mqtt import DeviceEvent, UpdateProgress, VersionWindow
from tests.conftest import RunningAgent
from tests.e2e.test_update_attacks import DEVICE, Fleet, target_of
from tests.models import ONNX_IR_VERSION, ONNX_OPSET, failing_onnx, mlp_onnx

StartAgent = Callable[..., RunningAgent]
CHUNK = 256 * 1024  # bytes the agent's downloader reads at a time


# -- probation's rules and counters, on their own -----------------------------------------------


def window(requests: int, errors: int = 0, fallbacks: int = 0, p95: float | None = 1.0) -> Any:
    return VersionWindow(
        version="x", requests=requests, errors=errors, fallbacks=fallbacks, p95_ms=p95, seconds=1
    )


POLICY = ProbationPolicy()


@pytest.mark.parametrize(
    ("candidate", "baseline", "reason"),
    [
        (window(100, errors=3), window(100, errors=2), None),  # +1 point: within 2
        (window(100, errors=5), window(100, errors=2), "error_rate"),  # +3 points
        (window(100, errors=3), window(5, errors=0), "error_rate"),  # a thin baseline counts as 0
        (window(100, errors=1, fallbacks=1), None, None),  # a new model: 1% from zero
        (window(100, fallbacks=3), window(100), "fallback_rate"),
        (window(100, p95=20.0), window(100, p95=10.0), "latency"),
        (window(100, p95=1.9), window(100, p95=1.0), None),  # under the 1 ms floor
        (window(100, p95=20.0), window(19, p95=1.0), None),  # baseline too thin for p95s
        (window(19, errors=19), window(100), None),  # too few requests to judge
    ],
)
def test_probation_judges_rates_and_latency_against_the_baseline(
    candidate: VersionWindow, baseline: VersionWindow | None, reason: str | None
) -> None:
    report, got = judge("m", candidate, baseline, POLICY)
    assert got == reason, report.reason
    assert report.verdict == ("passed" if reason is None else "failed")
    assert report.reason is not None
    if reason is not None:
        assert report.reason.startswith(reason)
    if candidate.requests < POLICY.min_requests:
        assert "too few requests" in report.reason


def test_version_counters_cut_windows_and_recent_periods() -> None:
    now = [100.0]
    counter = VersionCounter("1.0.0", clock=lambda: now[0])
    start = counter.mark()
    for i in range(30):  # 30 answers over 3 seconds at 1..30 ms, two failures, one fallback
        now[0] += 0.1
        counter.answered((i + 1) / 1000, now[0])
    counter.failed(now[0])
    counter.failed(now[0])
    counter.fell_back()
    everything = counter.window(start)
    assert counter.recent(3600) == everything  # "since start" when it started more recently
    assert (everything.requests, everything.errors, everything.fallbacks) == (32, 2, 1)
    assert everything.p95_ms == pytest.approx(np.percentile(np.arange(1, 31), 95))
    recent = counter.recent(1.0)  # the last second, give or take one mark
    assert 10 <= recent.requests <= 22
    mark = counter.mark()
    now[0] += 0.1
    counter.answered(0.5, now[0])
    later = counter.window(mark)
    assert (later.requests, later.p95_ms) == (1, pytest.approx(500.0))


def test_counters_of_versions_no_longer_kept_are_evicted() -> None:
    windows = VersionWindows()
    old = windows.counter("mlp", "1.0.0")
    old.answered(0.001, time.perf_counter())
    windows.counter("mlp", "2.0.0")
    windows.counter("other", "1.0.0")
    gone = windows.evict({("mlp", "2.0.0"), ("other", "1.0.0")})
    assert gone == [("mlp", "1.0.0")]
    assert windows.get("mlp", "1.0.0") is None
    assert windows.get("mlp", "2.0.0") is not None and windows.get("other", "1.0.0") is not None
    assert windows.counter("mlp", "1.0.0").requests == 0  # served again: counted from zero
    assert windows.evict(set()) and windows.get("other", "1.0.0") is None


def test_the_download_progress_interval_is_a_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert LifecycleConfig().progress_interval_s == 1.0
    default = AgentSettings(state_dir=tmp_path)
    assert LifecycleConfig.from_settings(default).progress_interval_s == 1.0
    chosen = AgentSettings(state_dir=tmp_path, update_progress_interval_s=0.5)
    assert LifecycleConfig.from_settings(chosen).progress_interval_s == 0.5
    monkeypatch.setenv("EDGEFLEET_AGENT_UPDATE_PROGRESS_INTERVAL_S", "2.5")
    from_env = AgentSettings(state_dir=tmp_path)
    assert LifecycleConfig.from_settings(from_env).progress_interval_s == 2.5
    field = AgentSettings.model_fields["update_progress_interval_s"]
    assert field.description is not None and field.description.startswith("s")


SHA_A, SHA_B = "a" * 64, "b" * 64


def test_known_good_versions_are_recorded_forgotten_and_survive_damage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    known = KnownGood(tmp_path)
    assert not known.holds("mlp", "1.0.0", SHA_A)  # nothing recorded yet
    known.record(
        [("mlp", CommittedVersion(version="2.0.0", sha256=SHA_B)),
         ("mlp", CommittedVersion(version="1.0.0", sha256=SHA_A))]
    )  # fmt: skip
    again = KnownGood(tmp_path)  # read from disk
    assert [v.version for v in again.committed("mlp")] == ["2.0.0", "1.0.0"]
    assert again.holds("mlp", "1.0.0", SHA_A)
    assert not again.holds("mlp", "1.0.0", SHA_B)  # other bytes under the same version
    assert not again.holds("other", "1.0.0", SHA_A)
    again.forget([("mlp", "2.0.0")])  # rolled back from: it proves itself again next time
    assert not known.holds("mlp", "2.0.0", SHA_B) and known.holds("mlp", "1.0.0", SHA_A)
    for i in range(12):  # bounded, most recent first
        known.record([("mlp", CommittedVersion(version=f"3.0.{i}", sha256=SHA_A))])
    assert [v.version for v in known.committed("mlp")][:2] == ["3.0.11", "3.0.10"]
    assert len(known.committed("mlp")) == 8
    (tmp_path / KNOWN_GOOD_FILE).write_text('{"schema": 1, "models": {"mlp": [1]}}')
    assert not known.holds("mlp", "3.0.11", SHA_A)
    assert "ignoring the damaged committed versions" in caplog.text


# -- models ------------------------------------------------------------------------------------


def slow_onnx(path: Path, *, width: int = 768, seed: int = 5) -> Path:
    """The MLP's signature (``input`` → ``logits``, ``label``) at about 10 ms a row: the
    hidden row is broadcast to a width × width matrix and multiplied by a square weight."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((64, width)) / 8).astype(np.float32)
    w2 = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    w3 = (rng.standard_normal((width, 10)) / np.sqrt(width)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Unsqueeze", ["r", "axis1"], ["r3"]),
        helper.make_node("Expand", ["r3", "square"], ["wide"]),
        helper.make_node("MatMul", ["wide", "w2"], ["m"]),
        helper.make_node("ReduceMean", ["m"], ["mean"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["mean", "w3"], ["logits"]),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        inputs=[helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        outputs=[
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        ],
        initializer=[
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(w3, "w3"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            numpy_helper.from_array(np.array([1, width, 1], dtype=np.int64), "square"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], ir_version=ONNX_IR_VERSION
    )
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(path))
    return path


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """New versions of ``mlp``: one that fails on two-row requests, a slow one, a large one."""
    d = tmp_path_factory.mktemp("versions")

    def bundle(model: Path, version: str, max_batch: int) -> Path:
        out = d / f"mlp-{version}.efb"
        create_bundle(model, name="mlp", version=version, out=out, max_batch=max_batch)
        return out

    return {
        "failing": bundle(failing_onnx(d / "failing.onnx", seed=4), "3.0.0", 1),
        "slow": bundle(slow_onnx(d / "slow.onnx"), "4.0.0", 8),
        # Several download chunks, so that a download can be caught half-way.
        "large": bundle(mlp_onnx(d / "large.onnx", hidden=8192, seed=6), "5.0.0", 8),
    }


# -- a device with an applier that records what it reports ------------------------------------


@dataclass
class Device:
    running: RunningAgent
    trust: TrustState
    applier: UpdateApplier
    downloads: Path
    progress: list[UpdateProgress] = field(default_factory=list)
    events: list[DeviceEvent] = field(default_factory=list)

    def apply(self, raw: bytes) -> UpdateOutcome:
        return self.running.call(self.applier.apply(raw))

    def submit(self, raw: bytes) -> None:
        self.running.call(self.applier.submit(raw))

    def stages(self, seq: int) -> list[str]:
        """The stages reported for ``seq``, repeated download progress counted once."""
        return [s for s, _ in itertools.groupby(p.stage for p in self.progress if p.seq == seq)]

    def final(self, seq: int, timeout: float = 30) -> UpdateProgress:
        wait_until(lambda: any(p.seq == seq and p.final for p in self.progress), timeout)
        return next(p for p in self.progress if p.seq == seq and p.final)

    def answer(self) -> dict[str, Any]:
        with self.running.client() as http:
            response = http.post("/v2/models/mlp/infer", json=rows(1))
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with ExitStack() as stack:
        yield Fleet(tmp_path / "fleet", stack)


@pytest.fixture
def device(
    fleet: Fleet, start_agent: StartAgent, bundles: dict[str, Path]
) -> Iterator[Callable[..., Device]]:
    """Start an agent serving mlp@1.0.0 (with ``settings``) and attach an applier to it."""
    catalogues: list[ModelCatalogue] = []

    def make(**settings: Any) -> Device:
        settings.setdefault("bundles", [bundles["mlp-1"]])
        running = start_agent(**settings)
        state_dir = running.settings.state_dir
        trust = TrustState.load(state_dir)
        trust.enroll(DEVICE, fleet.director_pem())
        catalogue = ModelCatalogue(
            state_dir / "trust" / "metadata",
            f"{fleet.url}/metadata",
            f"{fleet.url}/targets",
            fleet.repo.root_bytes(1),
            timeout=5,
        )
        catalogues.append(catalogue)
        downloads = state_dir / "downloads"
        found = Device(running, trust, None, downloads)  # type: ignore[arg-type]
        found.applier = UpdateApplier(
            running.agent,
            trust,
            catalogue,
            downloads,
            progress=found.progress.append,
            events=found.events.append,
        )
        return found

    yield make
    for catalogue in catalogues:
        catalogue.close()


def rows(n: int) -> dict[str, Any]:
    data = np.linspace(0, 1, 64 * n, dtype=np.float32).tolist()
    return {"inputs": [{"name": "input", "shape": [n, 64], "datatype": "FP32", "data": data}]}


class Load:
    """One client posting requests of ``sizes`` rows in turn until stopped; keeps every answer."""

    def __init__(self, running: RunningAgent, sizes: tuple[int, ...] = (1,)) -> None:
        self.answers: list[tuple[str, bool]] = []  # (version, whether the fallback answered)
        self.failures: list[str] = []
        self._running = running
        self._sizes = sizes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        bodies = itertools.cycle([rows(n) for n in self._sizes])
        # The Unix socket: over loopback TCP, Nagle and delayed ACKs hold each POST ~40 ms.
        with self._running.unix_client() as http:
            while not self._stop.is_set():
                response = http.post("/v2/models/mlp/infer", json=next(bodies))
                if response.status_code != 200:
                    self.failures.append(f"{response.status_code}: {response.text}")
                    continue
                body = response.json()
                self.answers.append((body["model_version"], body["parameters"]["fallback"]))

    def wait(self, count: int) -> None:
        wait_until(lambda: len(self.answers) >= count)

    def more(self, count: int) -> None:
        self.wait(len(self.answers) + count)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def trickle(fleet: Fleet, bundle: Path, pause: float) -> str:
    """Serve ``bundle`` one download chunk per ``pause`` seconds; returns its target path."""
    target = target_of(bundle).target_path
    data = bundle.read_bytes()

    async def body() -> AsyncIterator[bytes]:
        for start in range(0, len(data), CHUNK):
            yield data[start : start + CHUNK]
            await asyncio.sleep(pause)

    fleet.attacker.responses[fleet.bundle_url_path(target)] = lambda _: StreamingResponse(
        body(), headers={"content-length": str(len(data))}
    )
    return target


# -- probation under load ----------------------------------------------------------------------


def test_a_good_version_commits_after_probation_under_load(
    fleet: Fleet, device: Callable[..., Device], bundles: dict[str, Path]
) -> None:
    # 2.0.0 is as fast as 1.0.0: a p95 that moves by less than 5 ms is this shared host's
    # scheduling, not the version (the latency rule is tested with a slow version below).
    d = device(
        fallback=bundles["small"],
        probation_s=5,
        probation_requests=150,
        probation_min_latency_ms=5,
    )
    fleet.publish(bundles["mlp-2"])
    target = target_of(bundles["mlp-2"])
    with Load(d.running) as load:
        load.wait(40)  # the baseline: how 1.0.0 serves
        outcome = d.apply(fleet.desired(1, target))
        load.more(20)
    assert (outcome.status, outcome.reason) == ("committed", None), outcome.detail
    assert load.failures == []
    assert load.answers[0] == ("1.0.0", False) and load.answers[-1] == ("2.0.0", False)
    assert all(not fallback for _, fallback in load.answers)

    (report,) = outcome.probation
    assert report.verdict == "passed" and report.model == "mlp"
    assert report.candidate.version == "2.0.0" and report.candidate.requests >= 150
    assert report.candidate.errors == 0 and report.candidate.p95_ms is not None
    assert report.baseline is not None and report.baseline.version == "1.0.0"
    assert report.baseline.requests >= 40
    assert "probation of mlp" in outcome.detail

    assert d.stages(1) == [
        "received", "downloading", "verifying", "loading", "probation", "committed",
    ]  # fmt: skip
    downloading = [p for p in d.progress if p.stage == "downloading"]
    assert downloading[0].done_bytes == 0
    assert downloading[-1].done_bytes == downloading[-1].total_bytes == target.length
    assert all(p.device_id == DEVICE and p.rollout_id == "r-1" for p in d.progress)
    assert d.progress[-1].probation == outcome.probation
    assert d.trust.last_applied_seq == 1
    assert not (d.running.settings.state_dir / RECORD_FILE).exists()
    assert d.events == []


def test_a_version_that_fails_under_load_is_rolled_back_for_its_error_rate(
    fleet: Fleet, device: Callable[..., Device], bundles: dict[str, Path], versions: dict[str, Path]
) -> None:
    d = device(fallback=bundles["small"], probation_s=5, probation_requests=100)
    fleet.publish(versions["failing"])
    with Load(d.running, sizes=(1, 2)) as load:  # 3.0.0 fails every two-row request
        load.wait(40)
        outcome = d.apply(fleet.desired(1, target_of(versions["failing"])))
        load.more(20)
    assert (outcome.status, outcome.reason) == ("rolled_back", "error_rate"), outcome.detail
    (report,) = outcome.probation
    assert report.verdict == "failed" and report.candidate.version == "3.0.0"
    assert report.candidate.error_rate is not None and report.candidate.error_rate > 0.3
    assert report.baseline is not None and report.baseline.errors == 0
    assert "error_rate" in outcome.detail and "mlp@1.0.0" in outcome.detail

    # The fallback answered what 3.0.0 failed: no caller saw an error, before, during or after.
    assert load.failures == []
    assert ("3.0.0", False) in load.answers and ("mlp-small", True) not in load.answers
    assert load.answers[-1] == ("1.0.0", False)
    assert d.answer()["model_version"] == "1.0.0"
    assert d.running.agent.store.active("mlp").version == "1.0.0"  # type: ignore[union-attr]

    assert d.stages(1)[-2:] == ["probation", "rolled_back"]
    assert d.progress[-1].reason == "error_rate"
    (event,) = d.events
    assert (event.kind, event.model) == ("rollback", "mlp") and "3.0.0" in event.detail
    # Rolled back is final: the same document is not applied again.
    assert d.trust.last_applied_seq == 1
    again = d.apply(fleet.desired(1, target_of(versions["failing"])))
    assert (again.status, again.reason) == ("refused", "replayed")


def test_a_slower_version_is_rolled_back_for_its_latency(
    fleet: Fleet, device: Callable[..., Device], versions: dict[str, Path]
) -> None:
    d = device(probation_s=5, probation_requests=40)
    fleet.publish(versions["slow"])
    with Load(d.running) as load:
        load.wait(40)
        outcome = d.apply(fleet.desired(1, target_of(versions["slow"])))
        load.more(10)
    assert (outcome.status, outcome.reason) == ("rolled_back", "latency"), outcome.detail
    (report,) = outcome.probation
    assert report.baseline is not None and report.baseline.p95_ms is not None
    assert report.candidate.p95_ms is not None
    before = report.baseline.p95_ms
    assert report.candidate.p95_ms > max(1.5 * before, before + 1)
    assert report.candidate.errors == 0
    assert load.failures == [] and load.answers[-1] == ("1.0.0", False)


def test_a_quiet_device_commits_and_says_probation_could_not_judge(
    fleet: Fleet, device: Callable[..., Device], bundles: dict[str, Path]
) -> None:
    d = device(probation_s=0.3)
    fleet.publish(bundles["mlp-2"])
    outcome = d.apply(fleet.desired(1, target_of(bundles["mlp-2"])))
    assert outcome.status == "committed", outcome.detail
    assert "too few requests to judge" in outcome.detail
    assert outcome.probation[0].candidate.requests == 0
    assert d.answer()["model_version"] == "2.0.0"


# -- replaced, late ----------------------------------------------------------------------------


def test_a_newer_desired_state_replaces_a_download_in_flight_which_resumes_later(
    fleet: Fleet, device: Callable[..., Device], bundles: dict[str, Path], versions: dict[str, Path]
) -> None:
    d = device(probation_s=0.2)
    fleet.publish(versions["large"])
    fleet.publish(bundles["mlp-2"])
    large = trickle(fleet, versions["large"], pause=0.2)
    d.submit(fleet.desired(1, target_of(versions["large"])))  # returns at once
    wait_until(lambda: any(p.stage == "downloading" and p.done_bytes for p in d.progress))
    d.submit(fleet.desired(2, target_of(bundles["mlp-2"])))

    first = d.final(1)
    assert (first.stage, first.reason) == ("failed", "superseded"), first.detail
    assert "desired state 2" in first.detail
    assert d.final(2).stage == "committed"
    assert d.answer()["model_version"] == "2.0.0"
    assert d.stages(1) == ["received", "downloading", "failed"]
    assert d.trust.last_applied_seq == 2

    # The abandoned bytes stay, and the next desired state naming them resumes from there.
    (part,) = d.downloads.glob("*.part")
    kept = part.stat().st_size
    assert 0 < kept < target_of(versions["large"]).length
    del fleet.attacker.responses[fleet.bundle_url_path(large)]
    outcome = d.apply(fleet.desired(3, target_of(versions["large"])))
    assert outcome.status == "committed", outcome.detail
    assert f"bytes={kept}-" in fleet.attacker.target_requests
    assert d.answer()["model_version"] == "5.0.0"
    assert list(d.downloads.iterdir()) == []


def test_a_version_on_probation_stays_until_the_newer_desired_state_decides(
    fleet: Fleet, device: Callable[..., Device], bundles: dict[str, Path]
) -> None:
    d = device(probation_s=20)
    fleet.publish(bundles["mlp-1"])
    fleet.publish(bundles["mlp-2"])
    first = fleet.desired(1, target_of(bundles["mlp-2"]))
    d.submit(first)
    wait_until(lambda: "probation" in d.stages(1))
    d.submit(first)  # delivered twice (MQTT QoS 1): the same desired state, not a new one
    downloads = len(fleet.attacker.target_requests)
    outcome = d.apply(fleet.desired(2, target_of(bundles["mlp-1"])))  # back to 1.0.0

    first = d.final(1)
    assert (first.stage, first.reason) == ("failed", "superseded")
    assert outcome.status == "committed", outcome.detail
    assert outcome.probation == ()  # the committed version has nothing left to prove
    assert d.answer()["model_version"] == "1.0.0"
    assert len(fleet.attacker.target_requests) == downloads  # taken from the store
    assert d.stages(2) == ["received", "verifying", "loading", "committed"]
    assert d.stages(1) == ["received", "downloading", "verifying", "loading", "probation", "failed"]
    assert d.trust.last_applied_seq == 2


def test_a_desired_state_older_than_the_one_in_hand_is_refused(
    fleet: Fleet, device: Callable[..., Device], bundles: dict[str, Path]
) -> None:
    d = device(probation_s=20)
    fleet.publish(bundles["mlp-2"])
    d.submit(fleet.desired(3, target_of(bundles["mlp-2"])))
    wait_until(lambda: "probation" in d.stages(3))
    older = d.apply(fleet.desired(2, target_of(bundles["mlp-1"])))
    assert (older.status, older.reason) == ("refused", "replayed")
    assert "older than desired state 3" in older.detail
    assert d.answer()["model_version"] == "2.0.0"  # still on probation, untouched


def test_a_stop_during_probation_rolls_back_at_the_next_start(
    fleet: Fleet, device: Callable[..., Device], bundles: dict[str, Path], tmp_path: Path
) -> None:
    first = device(probation_s=20)
    fleet.publish(bundles["mlp-2"])
    first.submit(fleet.desired(1, target_of(bundles["mlp-2"])))
    wait_until(lambda: "probation" in first.stages(1))
    first.running.stop()

    # The store activated 2.0.0 and serves it at start; the record says it never committed.
    second = device(bundles=[], socket=tmp_path / "b.sock")
    outcome = second.running.call(second.applier.recover())
    assert outcome is not None
    assert (outcome.seq, outcome.status, outcome.reason) == (1, "rolled_back", "interrupted")
    assert "stage probation" in outcome.detail and "mlp@1.0.0 serving again" in outcome.detail
    assert second.answer()["model_version"] == "1.0.0"
    assert [e.kind for e in second.events] == ["rollback"]
    assert second.progress[-1].stage == "rolled_back"
    assert second.trust.last_applied_seq == 1
    assert second.running.call(second.applier.recover()) is outcome  # settled once


def test_the_retained_desired_state_at_start_does_not_reinstall_the_interrupted_version(
    fleet: Fleet, device: Callable[..., Device], bundles: dict[str, Path], tmp_path: Path
) -> None:
    first = device(probation_s=20)
    fleet.publish(bundles["mlp-2"])
    document = fleet.desired(1, target_of(bundles["mlp-2"]))
    first.submit(document)
    wait_until(lambda: "probation" in first.stages(1))
    first.running.stop()  # as a kill -9 would: the record says stage probation

    # A managed start: recovery begins while the link connects, and the broker delivers the
    # retained desired state (the same document) before recovery has settled it.
    second = device(bundles=[], socket=tmp_path / "b.sock", probation_s=0.2)
    applier = second.applier

    async def start() -> None:
        recovery = asyncio.ensure_future(applier.recover())
        await applier.submit(document)
        await recovery

    second.running.call(start())
    wait_until(lambda: sum(p.final for p in second.progress) >= 2)
    time.sleep(0.5)  # long enough for a wrongly accepted job to switch 2.0.0 in again
    recovered, answered = [p for p in second.progress if p.final]
    assert (recovered.seq, recovered.stage, recovered.reason) == (1, "rolled_back", "interrupted")
    assert (answered.stage, answered.reason) == ("refused", "replayed"), answered.detail
    assert second.stages(1) == ["rolled_back"]  # never received, loaded or switched again
    assert second.answer()["model_version"] == "1.0.0"
    assert second.running.agent.store.active("mlp").version == "1.0.0"  # type: ignore[union-attr]
    assert second.trust.last_applied_seq == 1


def test_a_desired_state_settled_before_its_job_starts_is_a_no_op(
    fleet: Fleet, device: Callable[..., Device], bundles: dict[str, Path]
) -> None:
    d = device(probation_s=0.2)
    fleet.publish(bundles["mlp-2"])

    async def accepted_then_settled() -> None:
        await d.applier.submit(fleet.desired(1, target_of(bundles["mlp-2"])))
        d.trust.applied(1)  # settled elsewhere before the queued job runs

    d.running.call(accepted_then_settled())
    final = d.final(1)
    assert (final.stage, final.reason) == ("refused", "replayed"), final.detail
    assert "counts as applied already" in final.detail
    assert d.stages(1) == ["refused"]
    assert fleet.attacker.target_requests == []
    assert d.answer()["model_version"] == "1.0.0"


def test_a_desired_state_settled_while_it_ran_is_not_committed(
    fleet: Fleet, device: Callable[..., Device], bundles: dict[str, Path]
) -> None:
    d = device(probation_s=1)
    fleet.publish(bundles["mlp-2"])
    d.submit(fleet.desired(1, target_of(bundles["mlp-2"])))
    wait_until(lambda: "probation" in d.stages(1))

    async def settle() -> None:
        d.trust.applied(1)

    d.running.call(settle())
    final = d.final(1)
    assert (final.stage, final.reason) == ("refused", "replayed"), final.detail
    assert "mlp@1.0.0 serving again" in final.detail
    assert d.answer()["model_version"] == "1.0.0"
    assert not (d.running.settings.state_dir / RECORD_FILE).exists()


def test_a_rollback_the_fleet_orders_returns_to_a_known_good_version_without_probation(
    fleet: Fleet, device: Callable[..., Device], bundles: dict[str, Path], versions: dict[str, Path]
) -> None:
    # 4.0.0 is slow but served here; 2.0.0 is fast. Judged against 2.0.0, the fleet's rollback
    # to 4.0.0 would fail probation for its latency and be refused.
    d = device(bundles=[versions["slow"]], probation_s=5, probation_requests=40)
    fleet.publish(bundles["mlp-2"])
    fleet.publish(versions["slow"])
    windows = d.running.agent.metrics.windows
    with Load(d.running) as load:
        load.wait(30)
        forward = d.apply(fleet.desired(1, target_of(bundles["mlp-2"])))
        assert forward.status == "committed", forward.detail
        assert windows.get("mlp", "4.0.0") is None  # no longer served: its counter is gone
        load.more(40)  # how 2.0.0 serves
        back = d.apply(fleet.desired(2, target_of(versions["slow"])))
        load.more(10)
    assert (back.status, back.reason) == ("committed", None), back.detail
    assert back.probation == ()
    assert "probation skipped for mlp@4.0.0: a return to a known-good version" in back.detail
    assert d.stages(2) == ["received", "verifying", "loading", "committed"]
    assert len(fleet.attacker.target_requests) == 1  # 2.0.0 only: 4.0.0 came from the store
    assert load.failures == [] and load.answers[-1] == ("4.0.0", False)
    assert d.events == []  # a switch the fleet asked for, not a rollback of the device's own
    assert windows.get("mlp", "2.0.0") is None and windows.get("mlp", "4.0.0") is not None
    assert d.trust.last_applied_seq == 2


def test_a_version_rolled_back_from_is_judged_again_when_it_returns(
    fleet: Fleet, device: Callable[..., Device], bundles: dict[str, Path], versions: dict[str, Path]
) -> None:
    d = device(fallback=bundles["small"], probation_s=5, probation_requests=60)
    fleet.publish(versions["failing"])
    known = KnownGood(d.running.settings.state_dir)
    failing = target_of(versions["failing"])
    # As though 3.0.0 had committed here once and then been collected from the store: it is
    # downloaded again, so it is judged.
    known.record([("mlp", CommittedVersion(version="3.0.0", sha256=failing.sha256))])
    with Load(d.running, sizes=(1, 2)) as load:  # 3.0.0 fails every two-row request
        load.wait(40)
        outcome = d.apply(fleet.desired(1, failing))
        load.more(10)
    assert (outcome.status, outcome.reason) == ("rolled_back", "error_rate"), outcome.detail
    # The store keeps 3.0.0 as a recent version; were it still known-good, a desired state
    # naming it would switch it in unjudged.
    assert "3.0.0" in d.running.agent.store.versions("mlp")
    assert not known.holds("mlp", "3.0.0", failing.sha256)
    assert d.running.agent.metrics.windows.get("mlp", "3.0.0") is None


def test_a_stage_past_its_deadline_fails_and_names_the_stage(
    fleet: Fleet, device: Callable[..., Device], versions: dict[str, Path]
) -> None:
    d = device(download_deadline_s=0.5)
    fleet.publish(versions["large"])
    trickle(fleet, versions["large"], pause=0.3)
    started = time.monotonic()
    outcome = d.apply(fleet.desired(1, target_of(versions["large"])))
    assert (outcome.status, outcome.reason) == ("failed", "deadline"), outcome.detail
    assert time.monotonic() - started < 5
    assert "stage downloading" in outcome.detail and "download_deadline_s" in outcome.detail
    assert d.answer()["model_version"] == "1.0.0"
    assert d.trust.last_applied_seq == 0  # failed: the same document may be sent again
    assert d.progress[-1].stage == "failed"


def test_a_load_past_its_deadline_fails_and_the_late_version_is_unloaded(
    fleet: Fleet,
    device: Callable[..., Device],
    versions: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="agent.service")
    d = device(load_deadline_s=0.01)  # the slow version's self-test alone takes longer
    fleet.publish(versions["slow"])
    outcome = d.apply(fleet.desired(1, target_of(versions["slow"])))
    assert (outcome.status, outcome.reason) == ("failed", "deadline"), outcome.detail
    assert "stage loading" in outcome.detail and "load_deadline_s" in outcome.detail
    assert d.stages(1)[-2:] == ["loading", "failed"]
    assert d.answer()["model_version"] == "1.0.0"

    # The load finished on its own after the deadline; its runner is closed, never served.
    wait_until(
        lambda: any(getattr(r, "version", None) == "4.0.0" for r in caplog.records
                    if r.getMessage() == "model loaded")
    )  # fmt: skip
    wait_until(lambda: not any("mlp@4.0.0" in t.name for t in threading.enumerate()))
    assert d.running.agent.models["mlp"].versions == ("1.0.0",)


def test_a_damaged_progress_record_is_ignored_at_start(
    device: Callable[..., Device], caplog: pytest.LogCaptureFixture
) -> None:
    d = device()
    record = d.running.settings.state_dir / RECORD_FILE
    record.parent.mkdir(parents=True)
    record.write_text('{"schema": 1, "seq": "not a number"}')
    assert d.running.call(d.applier.recover()) is None
    assert "ignoring the damaged update record" in caplog.text
    assert d.answer()["model_version"] == "1.0.0"
