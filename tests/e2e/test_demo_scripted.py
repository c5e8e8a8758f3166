"""`edgefleet demo --scripted` as a user runs it: a real process that builds the bundles, starts
the fleet service and three agents, rolls digits@2.1.0 out and digits@2.2.0 back, tells the story
and exits 0. The fleet's database it leaves behind says the same as the story."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.system import EDGEFLEET

pytestmark = pytest.mark.slow

DEVICES = ("demo-1", "demo-2", "demo-3")


@pytest.mark.timeout(400)
def test_the_scripted_demo_rolls_a_good_version_out_and_a_bad_one_back(tmp_path: Path) -> None:
    work = tmp_path / "work"
    started = time.monotonic()
    result = subprocess.run(
        [*EDGEFLEET, "demo", "--scripted", "--work-dir", str(work)],
        capture_output=True,
        text=True,
        timeout=360,
        check=False,
    )
    took = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    story = result.stdout
    # The good version: a canary wave, then the rest, each passing its gates.
    assert "1. Roll out digits@2.1.0" in story
    good = story[story.index("1. Roll out") : story.index("2. Roll out")]
    assert good.count("passed its gates:") == 2, good
    assert "rollout completed" in good
    for gate in ("failed_installs", "error_rate", "p95_latency", "fallback_rate", "drift"):
        assert gate in good, good
    # The bad version: probation on the canary rolls it back, the gates fail, it aborts.
    bad = story[story.index("2. Roll out") : story.index("3. What every device runs")]
    assert "rolled 2.2.0 back by itself: error_rate" in bad, bad
    assert "wave 1 of 2 failed its gates:" in bad and "rollout aborted" in bad, bad
    assert "wave 2 of 2" not in bad, bad  # the other devices were never touched
    assert "went back to 2.1.0: " in bad
    final = story[story.index("3. What every device runs") :]
    for device in DEVICES:
        assert f"{device}  healthy  digits@2.1.0" in final, final
    assert "The scripted demo went as it should." in story
    assert "by the fallback digits-small@1.0.0" in story
    assert took < 300, f"the scripted demo took {took:.0f} s"

    # What the fleet's database says afterwards.
    assert not (work / "stack.json").exists()  # the stack is down
    db = sqlite3.connect(work / "fleet" / "fleet.sqlite")
    try:
        rollouts = dict(db.execute("SELECT version, state FROM rollouts").fetchall())
        assert rollouts == {"2.1.0": "completed", "2.2.0": "aborted"}
        ((bad_id, reason, phase),) = db.execute(
            "SELECT id, reason, phase FROM rollouts WHERE version = '2.2.0'"
        ).fetchall()
        assert reason.startswith("wave 1 failed its gates"), reason
        assert phase == "done"  # every rollback was published
        waves = db.execute(
            "SELECT state, started_at FROM rollout_waves WHERE rollout_id = ? ORDER BY idx",
            (bad_id,),
        ).fetchall()
        assert [w[0] for w in waves] == ["failed", "pending"] and waves[1][1] is None, waves
        canary = db.execute(
            "SELECT device_id, previous_version, status FROM assignments "
            "WHERE rollout_id = ? AND seq IS NOT NULL",
            (bad_id,),
        ).fetchall()
        assert [(c[1], c[2]) for c in canary] == [("2.1.0", "rolled_back")], canary
        good_statuses = db.execute(
            "SELECT DISTINCT status FROM assignments a JOIN rollouts r ON r.id = a.rollout_id "
            "WHERE r.version = '2.1.0'"
        ).fetchall()
        assert good_statuses == [("committed",)]
        running = {
            device: {m["name"]: m["version"] for m in json.loads(state)["models"]}
            for device, state in db.execute("SELECT id, state FROM devices")
        }
        assert {d: m["digits"] for d, m in running.items()} == dict.fromkeys(DEVICES, "2.1.0")
        # The canary's own probation said why it went back.
        stages = db.execute(
            "SELECT reason FROM update_log WHERE device_id = ? AND rollout_id = ? "
            "AND stage = 'rolled_back'",
            (canary[0][0], bad_id),
        ).fetchall()
        assert ("error_rate",) in stages, stages
    finally:
        db.close()
