"""Fleet drift from the fleet database: counts summed over devices, windows and hourly rollups,
per group, PSI and Jensen–Shannon against the reference and against another version, and
records on the wrong bins refused whole.

The helpers here (a profile with known reference counts, versions published with it, drift
windows taken in through the store) are shared by the other drift tests."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from fleet.errors import DriftUnavailableError
from fleet.store import ModelVersion, Store, open_store
from fleet.telemetry.drift import FLEET, FleetDrift, HistogramDrift, rebin
from protocol.drift import jensen_shannon, psi
from protocol.manifest import DriftProfile, FeatureBins
from protocol.telemetry import LATENCY_BUCKETS_MS, DriftWindow, MetricsWindow
from tests.fleet.rollout_support import MODEL, START, add_device, manifest

# Reference: x[0] spread evenly over three intervals, the label evenly over two classes.
PROFILE = DriftProfile(
    features=(
        FeatureBins(
            name="x[0]",
            tensor="x",
            column=0,
            edges=(0.0, 1.0, 2.0, 3.0),
            counts=(0, 100, 100, 100, 0),
        ),
        FeatureBins(
            name="x[1]",
            tensor="x",
            column=1,
            edges=(0.0, 1.0, 2.0, 3.0),
            counts=(0, 100, 100, 100, 0),
        ),
    ),
    outputs=(
        FeatureBins(
            name="label",
            tensor="y",
            kind="categorical",
            categories=("0", "1"),
            counts=(150, 150, 0),
        ),
    ),
    psi_warn=0.1,
    psi_alert=0.25,
)
STEADY = (0, 100, 100, 100, 0)  # exactly the reference's shares
TILTED = (0, 50, 100, 150, 0)  # PSI against the reference: (1/6) ln 3
TILTED_PSI = math.log(3) / 6
SHIFTED = (0, 0, 0, 100, 200)  # most of it above the reference's range: PSI far above 0.25


def publish(store: Store, version: str, profile: DriftProfile | None = PROFILE) -> None:
    """Publish ``digits``@``version`` with ``profile`` as its drift profile."""
    release = len(store.models.find(MODEL)) + 1
    store.models.add(
        ModelVersion(
            name=MODEL,
            version=version,
            target_path=f"{MODEL}-{version}.efb",
            sha256=hashlib.sha256(f"{MODEL}@{version}".encode()).hexdigest(),
            length=100,
            runtime="onnxruntime",
            release=release,
            manifest=manifest(MODEL, version).model_copy(update={"drift": profile}),
            published_at=START,
            published_by="test",
        )
    )


class Reporter:
    """Devices' drift windows, taken in through the store as ingest takes them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.seqs: dict[str, int] = {}

    def window(
        self,
        device_id: str,
        version: str,
        start: datetime,
        features: Mapping[str, Sequence[int]],
        outputs: Mapping[str, Sequence[int]] | None = None,
        *,
        seconds: float = 10.0,
        role: str = "primary",
    ) -> DriftWindow:
        seq = self.seqs[device_id] = self.seqs.get(device_id, 0) + 1
        record = DriftWindow(
            device_id=device_id,
            seq=seq,
            start=start,
            end=start + timedelta(seconds=seconds),
            model=MODEL,
            version=version,
            role=role,  # type: ignore[arg-type]
            rows=max((sum(c) for c in features.values()), default=0),
            features={k: tuple(v) for k, v in features.items()},
            outputs={k: tuple(v) for k, v in (outputs or {}).items()},
        )
        self.store.telemetry.take([record], start + timedelta(seconds=seconds))
        return record

    def metrics(
        self,
        device_id: str,
        version: str,
        start: datetime,
        requests: int,
        *,
        errors: int = 0,
        fallbacks: int = 0,
        latency: Mapping[int, int] | None = None,
    ) -> MetricsWindow:
        """One metrics window; ``latency`` maps a LATENCY_BUCKETS_MS index to answered requests
        (default: every answered request in the 1-2.5 ms bucket)."""
        seq = self.seqs[device_id] = self.seqs.get(device_id, 0) + 1
        counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        for index, n in (latency or {5: requests - errors + fallbacks}).items():
            counts[index] = n
        record = MetricsWindow(
            device_id=device_id,
            seq=seq,
            start=start,
            end=start + timedelta(seconds=10),
            model=MODEL,
            version=version,
            seconds=10.0,
            requests=requests,
            errors=errors,
            timeouts=0,
            fallbacks=fallbacks,
            latency_counts=tuple(counts),
        )
        self.store.telemetry.take([record], start + timedelta(seconds=10))
        return record

    def counts(
        self,
        device_id: str,
        version: str,
        start: datetime,
        x0: Sequence[int],
        *,
        x1: Sequence[int] | None = None,
        label: Sequence[int] | None = None,
    ) -> DriftWindow:
        """One window with ``x0`` on feature x[0]; x[1] and the label as many rows, spread as
        the reference is unless given."""
        rows = sum(x0)
        steady = (0, rows // 3, rows // 3, rows - 2 * (rows // 3), 0)
        return self.window(
            device_id,
            version,
            start,
            {"x[0]": x0, "x[1]": x1 if x1 is not None else steady},
            {"label": label if label is not None else (rows // 2, rows - rows // 2, 0)},
        )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(tmp_path / "fleet.sqlite")
    publish(opened, "1.0.0")
    publish(opened, "2.0.0")
    add_device(opened, "cam-a", groups=("north",))
    add_device(opened, "cam-b", groups=("south",))
    add_device(opened, "cam-c", groups=("north", "south"))
    add_device(opened, "cam-d", groups=())
    yield opened
    opened.close()


def psi_of(histograms: Sequence[HistogramDrift], name: str) -> float:
    found = next(h.psi for h in histograms if h.name == name)
    assert found is not None, f"no PSI for {name}"
    return found


HOUR = timedelta(hours=1)


def test_counts_sum_over_devices_and_windows_before_psi_and_js(store: Store) -> None:
    reporter = Reporter(store)
    # (0, 50, 100, 150, 0) in all, split unevenly over two devices and three windows.
    reporter.counts("cam-a", "2.0.0", START, (0, 10, 20, 30, 0))
    reporter.counts("cam-a", "2.0.0", START + timedelta(seconds=10), (0, 15, 30, 45, 0))
    reporter.counts("cam-b", "2.0.0", START + timedelta(seconds=20), (0, 25, 50, 75, 0))
    reporter.counts("cam-b", "1.0.0", START, SHIFTED)  # another version: not summed
    reporter.counts("cam-b", "2.0.0", START - timedelta(seconds=1), SHIFTED)  # before the range
    reporter.counts("cam-b", "2.0.0", START + HOUR, SHIFTED)  # at its end, excluded

    report = FleetDrift(store).report(MODEL, "2.0.0", since=START, until=START + HOUR)

    assert (report.scope, report.against, report.devices, report.windows) == (
        "fleet",
        "reference",
        2,
        3,
    )
    assert report.rows == 300
    x0 = report.features[0]
    assert (x0.name, x0.kind, x0.rows) == ("x[0]", "feature", 300)
    assert x0.counts == (0, 50, 100, 150, 0)
    assert x0.reference == (0.0, 100.0, 100.0, 100.0, 0.0)
    assert x0.psi == pytest.approx(TILTED_PSI, rel=1e-3)
    assert x0.js == pytest.approx(jensen_shannon(np.asarray(x0.reference), x0.counts))
    assert x0.js is not None and 0 < x0.js < 0.1
    steady = report.features[1]
    assert steady.psi == pytest.approx(0.0, abs=1e-9)
    assert steady.js == pytest.approx(0.0, abs=1e-9)
    label = report.outputs[0]
    assert (label.kind, label.counts) == ("output", (150, 150, 0))
    assert label.psi == pytest.approx(0.0)
    assert report.worst() is x0 and report.worst("output") is label
    assert (report.psi_warn, report.psi_alert) == (0.1, 0.25)


def test_groups_scope_the_sum_and_a_device_in_two_groups_counts_in_both(store: Store) -> None:
    reporter = Reporter(store)
    reporter.counts("cam-a", "2.0.0", START, STEADY)  # north
    reporter.counts("cam-b", "2.0.0", START, SHIFTED)  # south
    reporter.counts("cam-c", "2.0.0", START, TILTED)  # north and south
    reporter.counts("cam-d", "2.0.0", START, STEADY)  # no group: the fleet only
    drift = FleetDrift(store)

    north = drift.report(MODEL, "2.0.0", since=START, until=START + HOUR, group="north")
    assert (north.scope, north.devices) == ("group:north", 2)
    assert north.features[0].counts == (0, 150, 200, 250, 0)
    south = drift.report(MODEL, "2.0.0", since=START, until=START + HOUR, group="south")
    assert south.features[0].counts == (0, 50, 100, 250, 200)

    scoped = drift.sums(MODEL, "2.0.0", PROFILE, since=START, until=START + HOUR, by_group=True)
    assert sorted(scoped) == ["fleet", "group:north", "group:south"]
    assert scoped["group:north"].features["x[0]"].tolist() == list(north.features[0].counts)
    assert scoped["group:south"].features["x[0]"].tolist() == list(south.features[0].counts)
    assert (scoped["group:north"].devices, scoped[FLEET].devices) == (
        {"cam-a", "cam-c"},
        {"cam-a", "cam-b", "cam-c", "cam-d"},
    )
    assert scoped[FLEET].features["x[0]"].tolist() == [0, 250, 300, 450, 200]
    assert psi_of(south.features, "x[0]") > 0.25
    assert psi_of(north.features, "x[0]") < 0.1


def test_hourly_rollups_count_like_the_windows_they_replaced(store: Store) -> None:
    reporter = Reporter(store)
    old = START - timedelta(days=3)
    for i in range(6):
        reporter.counts("cam-a", "2.0.0", old + timedelta(minutes=5 * i), (0, 10, 20, 30, 0))
    drift = FleetDrift(store)
    before = drift.report(MODEL, "2.0.0", since=old, until=old + HOUR)

    assert store.telemetry.roll_up("drift", old + HOUR, 100) == 6
    assert store.telemetry.drift(MODEL, "2.0.0") == []  # the raw windows are gone
    reporter.counts("cam-a", "2.0.0", old + timedelta(minutes=40), (0, 1, 1, 1, 0))  # a late one

    after = drift.report(MODEL, "2.0.0", since=old, until=old + HOUR)
    assert after.features[0].counts == (0, 61, 121, 181, 0)
    assert before.features[0].counts == (0, 60, 120, 180, 0)
    assert (after.windows, after.rows) == (2, 363)  # one hour row, one raw window


def test_a_record_on_other_bins_is_refused_whole_and_logged_once(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    reporter = Reporter(store)
    reporter.counts("cam-a", "2.0.0", START, STEADY)
    bad = reporter.counts("cam-b", "2.0.0", START, (1, 2, 3, 4), x1=SHIFTED)  # 4 bins, not 5
    drift = FleetDrift(store)

    with caplog.at_level(logging.WARNING, logger="fleet.telemetry.drift"):
        report = drift.report(MODEL, "2.0.0", since=START, until=START + HOUR)
        again = drift.report(MODEL, "2.0.0", since=START, until=START + HOUR)

    assert report.refused == again.refused == 1
    assert (report.devices, report.windows, report.rows) == (1, 1, 300)
    # Its other, well-formed histograms are not summed either.
    assert report.features[1].counts == STEADY
    refusals = [r for r in caplog.records if r.getMessage() == "drift counts refused"]
    assert len(refusals) == 1
    assert refusals[0].device == "cam-b"  # type: ignore[attr-defined]
    assert refusals[0].record == f"seq {bad.seq}"  # type: ignore[attr-defined]
    assert "'x[0]' has 4 bins where the profile has 5" in refusals[0].detail  # type: ignore[attr-defined]


def test_a_damaged_row_is_refused_not_a_crash(store: Store) -> None:
    reporter = Reporter(store)
    reporter.counts("cam-a", "2.0.0", START, STEADY)
    reporter.counts("cam-b", "2.0.0", START, TILTED)
    store.db.execute(
        "UPDATE drift_windows SET features = '{\"x[0]\": [1, -2' WHERE device_id = 'cam-b'"
    )
    report = FleetDrift(store).report(MODEL, "2.0.0", since=START, until=START + HOUR)
    assert (report.refused, report.devices) == (1, 1)
    assert report.features[0].counts == STEADY


def test_histograms_without_rows_or_profile_say_so(store: Store) -> None:
    publish(store, "3.0.0", profile=None)
    drift = FleetDrift(store)
    empty = drift.report(MODEL, "2.0.0", since=START, until=START + HOUR)
    assert (empty.rows, empty.devices) == (0, 0)
    assert all(h.psi is None and h.note == "no rows counted" for h in empty.histograms())
    assert empty.worst() is None
    with pytest.raises(DriftUnavailableError, match=r"digits@3.0.0 has no drift profile"):
        drift.report(MODEL, "3.0.0", since=START, until=START + HOUR)


def test_against_another_version_its_counts_are_spread_onto_these_bins(store: Store) -> None:
    coarse = DriftProfile(
        features=(
            FeatureBins(
                name="x[0]", tensor="x", column=0, edges=(0.0, 1.5, 3.0), counts=(0, 5, 5, 0)
            ),
        ),
        outputs=PROFILE.outputs,
    )
    publish(store, "0.9.0", profile=coarse)
    reporter = Reporter(store)
    # 0.9.0: 100 rows in [0, 1.5], 200 in [1.5, 3], 30 above: spread evenly onto 2.0.0's bins
    # [0, 1) gets 100 * 1/1.5, [1, 2) 100 * 0.5/1.5 + 200 * 0.5/1.5, [2, 3] 200 * 1/1.5.
    reporter.window("cam-a", "0.9.0", START, {"x[0]": (0, 100, 200, 30)}, {"label": (100, 200, 0)})
    reporter.counts("cam-b", "2.0.0", START, TILTED, label=(100, 200, 0))

    report = FleetDrift(store).report(
        MODEL, "2.0.0", since=START, until=START + HOUR, against="0.9.0"
    )
    assert report.against == "0.9.0"
    x0 = report.features[0]
    assert x0.reference == pytest.approx((0.0, 200 / 3, 100.0, 400 / 3, 30.0))
    assert x0.psi == pytest.approx(psi(np.asarray(x0.reference), TILTED))
    assert (
        psi_of(report.features, "x[0]") > 0.25
    )  # 0.9.0 saw 10% above the range, 2.0.0 none: the shares moved
    assert report.outputs[0].psi == pytest.approx(0.0, abs=1e-9)  # same classes, same shares
    # 0.9.0 has no x[1]: nothing to compare it with, said plainly.
    assert report.features[1].psi is None
    assert report.features[1].note == "0.9.0 has no feature named 'x[1]'"


def test_rebin_keeps_every_count_and_maps_categories_by_name() -> None:
    source = FeatureBins(name="f", tensor="x", edges=(0.0, 1.0, 2.0), counts=(0, 0, 0, 0))
    target = FeatureBins(name="f", tensor="x", edges=(0.5, 1.5), counts=(0, 0, 0))
    spread = rebin(np.array([1, 10, 20, 3]), source, target)
    assert spread is not None
    # under: 1 + half of [0, 1]; middle: the other half + half of [1, 2]; over: the rest + 3.
    assert spread.tolist() == [6.0, 15.0, 13.0]
    assert rebin(np.array([1, 10, 20, 3]), source, source).tolist() == [1, 10, 20, 3]  # type: ignore[union-attr]

    cats = FeatureBins(
        name="c", tensor="y", kind="categorical", categories=("a", "b"), counts=(0, 0, 0)
    )
    other = FeatureBins(
        name="c", tensor="y", kind="categorical", categories=("b", "c"), counts=(0, 0, 0)
    )
    mapped = rebin(np.array([5, 7, 1]), cats, other)
    assert mapped is not None and mapped.tolist() == [7.0, 0.0, 6.0]  # a and the rest: other
    assert rebin(np.array([5, 7, 1]), cats, source) is None
