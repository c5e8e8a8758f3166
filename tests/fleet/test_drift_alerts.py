"""The drift monitor on a real fleet database with a clock the test moves: alerts raised, kept
up to date, changing level and cleared, fleet-wide and per group, each change in the audit log;
too few rows say nothing."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest

from fleet.store import Store
from fleet.store.drift import DriftAlerts
from fleet.telemetry.alerts import ACTOR, DriftMonitor
from protocol.manifest import DriftProfile, FeatureBins
from tests.fleet.rollout_support import MODEL, START, Clock
from tests.fleet.test_drift import SHIFTED, STEADY, TILTED, Reporter, publish, store

__all__ = ["store"]  # the fixture, shared with the drift tests

WINDOW = timedelta(seconds=600)


def monitor(store: Store, clock: Clock, *, min_rows: int = 500, **batches: int) -> DriftMonitor:
    return DriftMonitor(store, check_s=30, window_s=600, min_rows=min_rows, clock=clock, **batches)


def audit(store: Store) -> list[tuple[str, str, str | None, str | None]]:
    return [
        (e.action, e.subject, (e.detail or {}).get("scope"), (e.detail or {}).get("feature"))
        for e in reversed(store.audit.find(actor=ACTOR))
    ]


async def test_psi_over_the_alert_threshold_raises_then_updates_then_clears(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(START + timedelta(minutes=5))
    watcher = monitor(store, clock)
    reporter = Reporter(store)
    # cam-d is in no group: its drift shows fleet-wide only.
    reporter.counts("cam-d", "2.0.0", START, SHIFTED)
    reporter.counts("cam-d", "2.0.0", START + timedelta(seconds=10), SHIFTED)

    with caplog.at_level(logging.WARNING, logger="fleet.telemetry.alerts"):
        changes = await watcher.tick()
    assert [(c.change, c.alert.scope, c.alert.feature) for c in changes] == [
        ("raised", "fleet", "x[0]")
    ]
    alert = changes[0].alert
    assert (alert.model, alert.version, alert.kind, alert.level) == (
        MODEL,
        "2.0.0",
        "feature",
        "alert",
    )
    assert alert.psi > 0.25 and alert.js is not None and alert.threshold == 0.25
    assert alert.rows == 600 and alert.cleared_at is None and alert.raised_at == clock()
    assert audit(store) == [("drift.raised", "digits@2.0.0", "fleet", "x[0]")]
    raised = next(r for r in caplog.records if r.getMessage() == "drift alert raised")
    assert (raised.feature, raised.level) == ("x[0]", "alert")  # type: ignore[attr-defined]

    assert await watcher.tick() == []  # checked 0 s ago: not due
    clock.advance(30)
    reporter.counts("cam-d", "2.0.0", clock() - timedelta(seconds=10), SHIFTED)
    changes = await watcher.tick()
    assert [(c.change, c.alert.id, c.alert.rows) for c in changes] == [("updated", alert.id, 900)]
    assert changes[0].alert.updated_at == clock()
    assert len(audit(store)) == 1  # an update is not news

    # The shifted windows age out of the window (kept in whole minutes); steady ones replace them.
    clock.advance(660)
    reporter.counts("cam-d", "2.0.0", clock() - timedelta(seconds=30), STEADY)
    reporter.counts("cam-d", "2.0.0", clock() - timedelta(seconds=20), STEADY)
    changes = await watcher.tick()
    assert [(c.change, c.alert.id) for c in changes] == [("cleared", alert.id)]
    cleared = changes[0].alert
    assert cleared.cleared_at == clock() and cleared.psi < 0.1 and cleared.rows == 600
    alerts = DriftAlerts(store.db)
    assert alerts.find(state="open") == []
    assert [a.id for a in alerts.find(state="all")] == [alert.id]
    assert audit(store)[-1] == ("drift.cleared", "digits@2.0.0", "fleet", "x[0]")


def test_warn_then_alert_is_one_alert_changing_level(store: Store) -> None:
    clock = Clock(START + timedelta(minutes=1))
    watcher = monitor(store, clock, min_rows=100)
    reporter = Reporter(store)
    reporter.counts("cam-d", "2.0.0", START, TILTED)  # PSI 0.18: a warning
    [warned] = watcher.check(clock())
    assert (warned.change, warned.alert.level, warned.alert.threshold) == ("raised", "warn", 0.1)

    clock.advance(30)
    reporter.counts("cam-d", "2.0.0", START + timedelta(seconds=30), SHIFTED)
    [escalated] = watcher.check(clock())
    assert (escalated.change, escalated.alert.id) == ("level_changed", warned.alert.id)
    assert (escalated.alert.level, escalated.alert.threshold) == ("alert", 0.25)
    assert [a for a, *_ in audit(store)] == ["drift.raised", "drift.level_changed"]


def test_each_group_has_its_own_alerts(store: Store) -> None:
    clock = Clock(START + timedelta(minutes=1))
    watcher = monitor(store, clock, min_rows=100)
    reporter = Reporter(store)
    reporter.counts("cam-a", "2.0.0", START, STEADY)  # north
    reporter.counts("cam-a", "2.0.0", START + timedelta(seconds=1), STEADY)
    reporter.counts("cam-a", "2.0.0", START + timedelta(seconds=2), STEADY)
    reporter.counts("cam-b", "2.0.0", START, SHIFTED)  # south

    changes = watcher.check(clock())
    raised = sorted((c.alert.scope, c.alert.feature, c.alert.level) for c in changes)
    # South drifts, north does not; the fleet (900 steady rows, 300 shifted) drifts less.
    assert raised == [("fleet", "x[0]", "alert"), ("group:south", "x[0]", "alert")]
    fleet = next(c.alert for c in changes if c.alert.scope == "fleet")
    south = next(c.alert for c in changes if c.alert.scope == "group:south")
    assert fleet.psi < south.psi

    # South's device stops sending: nothing drifts there any more, and the fleet recovers.
    clock.advance(700)
    for i in range(3):
        reporter.counts("cam-a", "2.0.0", clock() - timedelta(seconds=10 + i), STEADY)
    changes = watcher.check(clock())
    assert sorted((c.change, c.alert.scope) for c in changes) == [
        ("cleared", "fleet"),
        ("cleared", "group:south"),
    ]
    south_cleared = next(c.alert for c in changes if c.alert.scope == "group:south")
    assert south_cleared.rows == 0  # cleared for lack of rows, not by a reading


def test_too_few_rows_neither_raise_nor_clear(store: Store) -> None:
    clock = Clock(START + timedelta(minutes=1))
    watcher = monitor(store, clock, min_rows=500)
    reporter = Reporter(store)
    reporter.counts("cam-d", "2.0.0", START, SHIFTED)  # 300 rows
    assert watcher.check(clock()) == []
    reporter.counts("cam-d", "2.0.0", START + timedelta(seconds=10), SHIFTED)
    [raised] = watcher.check(clock())
    assert raised.change == "raised"

    clock.advance(600)
    reporter.counts("cam-d", "2.0.0", clock() - timedelta(seconds=5), STEADY)  # 300 steady rows
    assert watcher.check(clock()) == []  # too few to clear it
    assert DriftAlerts(store.db).find()[0].id == raised.alert.id


def test_versions_without_a_profile_are_skipped_and_said_once(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    publish(store, "3.0.0", profile=None)
    clock = Clock(START + timedelta(minutes=1))
    watcher = monitor(store, clock, min_rows=1)
    reporter = Reporter(store)
    reporter.counts("cam-d", "3.0.0", START, SHIFTED)
    reporter.counts("cam-d", "2.0.0", START, SHIFTED)
    with caplog.at_level(logging.INFO, logger="fleet.telemetry.alerts"):
        first = watcher.check(clock())
        second = watcher.check(clock())
    assert {c.alert.version for c in first} == {"2.0.0"}
    assert second == []  # no new counts
    said = [r for r in caplog.records if "without a profile" in r.getMessage()]
    assert len(said) == 1 and said[0].version == "3.0.0"  # type: ignore[attr-defined]


async def test_a_backlog_is_read_a_few_windows_per_tick_and_counted_once(store: Store) -> None:
    reporter = Reporter(store)
    for i in range(5):
        reporter.counts("cam-d", "2.0.0", START + timedelta(seconds=10 * i), SHIFTED)
    clock = Clock(START + timedelta(minutes=2))
    watcher = monitor(store, clock, min_rows=100, batch=2, batches_per_tick=1)
    assert await watcher.tick() == []  # two of five windows read
    assert await watcher.tick() == []  # four
    [raised] = await watcher.tick()  # all five: judged
    assert (raised.change, raised.alert.rows) == ("raised", 1500)
    assert await watcher.tick() == []  # not due again yet

    # A restarted service reads the window afresh: the same counts, nothing new to record.
    again = monitor(store, clock, min_rows=100)
    assert again.check(clock()) == []
    reporter.counts("cam-d", "2.0.0", START + timedelta(seconds=50), SHIFTED)
    [kept] = again.check(clock())
    assert (kept.change, kept.alert.id, kept.alert.rows) == ("updated", raised.alert.id, 1800)


def test_windows_arriving_after_their_window_passed_are_not_counted(store: Store) -> None:
    clock = Clock(START + timedelta(minutes=30))
    watcher = monitor(store, clock, min_rows=100)
    assert watcher.check(clock()) == []
    reporter = Reporter(store)
    reporter.counts("cam-d", "2.0.0", START, SHIFTED)  # 30 minutes late, after a long outage
    reporter.counts("cam-d", "2.0.0", clock() - timedelta(seconds=30), STEADY)
    clock.advance(30)
    assert watcher.check(clock()) == []  # 300 steady rows: nothing to say


@pytest.mark.parametrize("emptied_by", ["stream reset", "retention"])
def test_windows_stored_after_the_newest_rows_went_are_all_read(
    store: Store, emptied_by: str
) -> None:
    clock = Clock(START + timedelta(minutes=1))
    watcher = monitor(store, clock, min_rows=100)
    reporter = Reporter(store)
    reporter.counts("cam-d", "2.0.0", START, STEADY)
    reporter.counts("cam-d", "2.0.0", START + timedelta(seconds=10), STEADY)
    assert watcher.check(clock()) == []  # 600 steady rows read
    # The newest raw rows leave the table (summed into their hour): ids must not be reused.
    if emptied_by == "stream reset":
        store.telemetry.reset_stream("cam-d")  # enrolled again: its stream starts at seq 1
        reporter.seqs["cam-d"] = 0
    else:
        assert store.telemetry.roll_up("drift", clock(), 100) == 2
    assert store.db.execute("SELECT count(*) FROM drift_windows").fetchone()[0] == 0
    for i in range(3):
        reporter.counts("cam-d", "2.0.0", START + timedelta(seconds=20 + i), SHIFTED)
    clock.advance(30)
    [raised] = watcher.check(clock())
    assert (raised.change, raised.alert.feature, raised.alert.rows) == ("raised", "x[0]", 1500)


def test_drift_windows_replaced_under_the_monitor_are_read_afresh(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(START + timedelta(minutes=1))
    watcher = monitor(store, clock, min_rows=100)
    reporter = Reporter(store)
    for i in range(3):
        reporter.counts("cam-d", "2.0.0", START + timedelta(seconds=i), STEADY)
    assert watcher.check(clock()) == []
    # The table as a restored backup leaves it: other rows, ids counted from 1 again.
    store.db.execute("DELETE FROM drift_windows")
    store.db.execute("DELETE FROM sqlite_sequence WHERE name = 'drift_windows'")
    reporter.counts("cam-d", "2.0.0", START + timedelta(seconds=30), SHIFTED)
    clock.advance(30)
    with caplog.at_level(logging.WARNING, logger="fleet.telemetry.alerts"):
        [raised] = watcher.check(clock())
    assert raised.alert.rows == 300  # the table's rows now, none counted twice or skipped
    assert any("replaced under the drift monitor" in r.getMessage() for r in caplog.records)


def test_windows_from_a_clock_far_ahead_are_left_out_and_said_once_per_device(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(START + timedelta(minutes=1))
    watcher = monitor(store, clock, min_rows=100)
    reporter = Reporter(store)
    reporter.counts("cam-d", "2.0.0", START, STEADY)
    reporter.counts("cam-a", "2.0.0", clock() + timedelta(hours=3), SHIFTED)  # north, 3 h ahead
    reporter.counts("cam-a", "2.0.0", clock() + timedelta(hours=3, seconds=10), SHIFTED)
    reporter.counts("cam-b", "2.0.0", clock() + timedelta(minutes=2), SHIFTED)  # south, a bit
    with caplog.at_level(logging.WARNING, logger="fleet.telemetry.alerts"):
        changes = watcher.check(clock())
    raised = sorted((c.alert.scope, c.alert.feature, c.alert.rows) for c in changes)
    # cam-b counts now; cam-a's windows do not count at all: nothing in north.
    assert raised == [("fleet", "x[0]", 600), ("group:south", "x[0]", 300)]
    ahead = [r for r in caplog.records if "ahead of the fleet's clock" in r.getMessage()]
    assert [r.device for r in ahead] == ["cam-a"]  # type: ignore[attr-defined]

    # Once the window has passed nothing is left to hold the alerts open: cam-b's window
    # counted in the minute it arrived, cam-a's nowhere.
    clock.advance(11 * 60)
    changes = watcher.check(clock())
    assert sorted((c.change, c.alert.scope) for c in changes) == [
        ("cleared", "fleet"),
        ("cleared", "group:south"),
    ]


def test_counts_of_minutes_after_a_clock_stepped_back_are_dropped(store: Store) -> None:
    clock = Clock(START + timedelta(hours=2))
    watcher = monitor(store, clock, min_rows=100)
    Reporter(store).counts("cam-d", "2.0.0", clock() - timedelta(seconds=30), SHIFTED)
    [raised] = watcher.check(clock())
    assert raised.change == "raised"
    clock.advance(-3600)  # the fleet's clock corrected by an hour
    [cleared] = watcher.check(clock())
    assert (cleared.change, cleared.alert.id, cleared.alert.rows) == ("cleared", raised.alert.id, 0)


def test_a_feature_and_an_output_of_one_name_have_an_alert_each(store: Store) -> None:
    bins = (0.0, 1.0, 2.0, 3.0)
    publish(
        store,
        "5.0.0",
        DriftProfile(
            features=(FeatureBins(name="score", tensor="x", edges=bins, counts=STEADY),),
            outputs=(FeatureBins(name="score", tensor="y", edges=bins, counts=STEADY),),
        ),
    )
    clock = Clock(START + timedelta(minutes=1))
    watcher = monitor(store, clock, min_rows=100)
    reporter = Reporter(store)
    reporter.window("cam-d", "5.0.0", START, {"score": SHIFTED}, {"score": SHIFTED})
    changes = watcher.check(clock())
    assert sorted((c.change, c.alert.kind, c.alert.feature) for c in changes) == [
        ("raised", "feature", "score"),
        ("raised", "output", "score"),
    ]

    clock.advance(30)
    reporter.window("cam-d", "5.0.0", START + timedelta(seconds=30), {"score": SHIFTED},
                    {"score": STEADY})  # fmt: skip
    changes = watcher.check(clock())
    assert sorted((c.change, c.alert.kind, c.alert.rows) for c in changes) == [
        ("updated", "feature", 600),
        ("updated", "output", 600),
    ]
    assert {a.kind for a in DriftAlerts(store.db).find(version="5.0.0")} == {"feature", "output"}
