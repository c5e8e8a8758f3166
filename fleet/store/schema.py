"""The fleet database's schema, as an ordered list of migrations.

A migration is applied once, in order, inside one transaction, and its number recorded in
``schema_migrations``. Never edit a migration that has shipped: add the next one. Times are
ISO 8601 UTC text; JSON columns hold documents the repositories parse with pydantic.
"""

from __future__ import annotations

__all__ = ["MIGRATIONS"]

_INITIAL = """
CREATE TABLE devices (
    id              TEXT PRIMARY KEY,
    enrolled_at     TEXT,
    first_seen      TEXT,
    last_seen       TEXT,
    connection      TEXT NOT NULL DEFAULT 'never',  -- never | online | offline | lost
    agent_version   TEXT,
    state           TEXT,                           -- last AgentState message, JSON
    trust_status    TEXT,
    desired_seq     INTEGER NOT NULL DEFAULT 0,     -- last director sequence issued
    desired         TEXT                            -- last signed desired state, JSON
);

CREATE TABLE device_labels (
    device_id  TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    kind       TEXT NOT NULL CHECK (kind IN ('group', 'tag')),
    value      TEXT NOT NULL,
    PRIMARY KEY (device_id, kind, value)
);
CREATE INDEX device_labels_by_value ON device_labels (kind, value);

CREATE TABLE model_versions (
    name          TEXT NOT NULL,
    version       TEXT NOT NULL,
    target_path   TEXT NOT NULL UNIQUE,
    sha256        TEXT NOT NULL,
    length        INTEGER NOT NULL,
    runtime       TEXT NOT NULL,
    release       INTEGER NOT NULL,
    manifest      TEXT NOT NULL,                    -- the bundle's manifest, JSON
    published_at  TEXT NOT NULL,
    published_by  TEXT NOT NULL,
    PRIMARY KEY (name, version)
);

CREATE TABLE rollouts (
    id               TEXT PRIMARY KEY,
    model            TEXT NOT NULL,
    version          TEXT NOT NULL,
    selector         TEXT NOT NULL,                 -- {"groups": [...], "tags": [...]}, JSON
    policy           TEXT NOT NULL,                 -- waves, soak, deadline, gates ..., JSON
    state            TEXT NOT NULL,
    wave             INTEGER NOT NULL DEFAULT 0,    -- index of the current wave
    phase            TEXT,                          -- where the current wave stands
    phase_started_at TEXT,
    reason           TEXT,                          -- why it paused, failed or was aborted
    superseded_by    TEXT REFERENCES rollouts(id),
    created_at       TEXT NOT NULL,
    created_by       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    FOREIGN KEY (model, version) REFERENCES model_versions(name, version)
);
CREATE INDEX rollouts_by_state ON rollouts (state);

CREATE TABLE rollout_waves (
    rollout_id   TEXT NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
    idx          INTEGER NOT NULL,
    percent      REAL NOT NULL,
    state        TEXT NOT NULL,                     -- pending | publishing | ... | passed | failed
    started_at   TEXT,
    finished_at  TEXT,
    gates        TEXT,                              -- the last gate results, JSON
    PRIMARY KEY (rollout_id, idx)
);

CREATE TABLE assignments (
    rollout_id        TEXT NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
    device_id         TEXT NOT NULL REFERENCES devices(id),
    wave              INTEGER NOT NULL,
    previous_version  TEXT,                         -- what the device ran before the rollout
    seq               INTEGER,                      -- the desired state published for it
    status            TEXT NOT NULL,                -- pending | published | <update stage> | ...
    reason            TEXT,
    detail            TEXT,
    probation         TEXT,                         -- the device's probation reports, JSON
    updated_at        TEXT NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX assignments_by_device ON assignments (device_id);
CREATE INDEX assignments_by_wave ON assignments (rollout_id, wave, status);

CREATE TABLE update_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id   TEXT NOT NULL,
    seq         INTEGER,
    rollout_id  TEXT,
    stage       TEXT NOT NULL,
    reason      TEXT,
    detail      TEXT,
    at          TEXT NOT NULL
);
CREATE INDEX update_log_by_device ON update_log (device_id, id);

CREATE TABLE audit (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at       TEXT NOT NULL,
    actor    TEXT NOT NULL,
    action   TEXT NOT NULL,
    subject  TEXT NOT NULL,
    detail   TEXT                                   -- JSON
);

CREATE TABLE api_tokens (
    id            TEXT PRIMARY KEY,                 -- short public id, shown in lists
    name          TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    token_sha256  TEXT NOT NULL UNIQUE,
    created_at    TEXT NOT NULL,
    created_by    TEXT NOT NULL,
    last_used_at  TEXT,
    revoked_at    TEXT
);
"""

# Telemetry: one row per record a device sent, keyed by its per-device sequence number so that a
# replayed record is ignored; hourly rollups replace raw windows past their retention.
_TELEMETRY = """
CREATE TABLE telemetry_streams (
    device_id      TEXT PRIMARY KEY,
    high_seq       INTEGER NOT NULL,               -- highest sequence number received
    received       INTEGER NOT NULL DEFAULT 0,     -- records taken (duplicates not counted)
    duplicates     INTEGER NOT NULL DEFAULT 0,
    dropped        INTEGER NOT NULL DEFAULT 0,     -- records the device said its spool dropped
    last_at        TEXT NOT NULL
);

CREATE TABLE telemetry_gaps (
    device_id   TEXT NOT NULL,
    first_seq   INTEGER NOT NULL,                  -- the missing sequence numbers, inclusive
    last_seq    INTEGER NOT NULL,
    -- missing: not received (yet); dropped: the device said its spool discarded them
    cause       TEXT NOT NULL DEFAULT 'missing' CHECK (cause IN ('missing', 'dropped')),
    noticed_at  TEXT NOT NULL,
    PRIMARY KEY (device_id, first_seq)
);

CREATE TABLE metrics_windows (
    device_id          TEXT NOT NULL,
    seq                INTEGER NOT NULL,
    model              TEXT NOT NULL,
    version            TEXT NOT NULL,
    role               TEXT NOT NULL,              -- primary | shadow
    start              TEXT NOT NULL,
    end                TEXT NOT NULL,
    seconds            REAL NOT NULL,
    requests           INTEGER NOT NULL,
    errors             INTEGER NOT NULL,
    timeouts           INTEGER NOT NULL,
    fallbacks          INTEGER NOT NULL,
    latency_p50_ms     REAL,
    latency_p95_ms     REAL,
    latency_p99_ms     REAL,
    latency_counts     TEXT NOT NULL,              -- JSON list on LATENCY_BUCKETS_MS
    batches            INTEGER NOT NULL,
    batch_rows         INTEGER NOT NULL,
    queue_ms_mean      REAL,
    queue_ms_p95       REAL,
    device             TEXT,
    cpu_percent        REAL,
    rss_mb             REAL,
    outcomes           INTEGER NOT NULL,
    outcome_successes  INTEGER NOT NULL,
    compared           INTEGER NOT NULL,
    agreements         INTEGER NOT NULL,
    champion           TEXT,
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX metrics_windows_by_version ON metrics_windows (model, version, start);
CREATE INDEX metrics_windows_by_start ON metrics_windows (start);

CREATE TABLE drift_windows (
    -- Never reused (AUTOINCREMENT), even after the newest rows are rolled up: the drift
    -- monitor reads the windows stored after the last id it read.
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id  TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    model      TEXT NOT NULL,
    version    TEXT NOT NULL,
    role       TEXT NOT NULL,
    start      TEXT NOT NULL,
    end        TEXT NOT NULL,
    rows       INTEGER NOT NULL,
    unsampled  INTEGER NOT NULL,
    features   TEXT NOT NULL,                      -- JSON {name: [counts]}
    outputs    TEXT NOT NULL,                      -- JSON {name: [counts]}
    psi        TEXT NOT NULL,                      -- JSON {name: psi of this window alone}
    UNIQUE (device_id, seq)
);
CREATE INDEX drift_windows_by_version ON drift_windows (model, version, start);
CREATE INDEX drift_windows_by_start ON drift_windows (start);

-- Raw windows older than the retention are summed per device, model, version, role and hour.
CREATE TABLE metrics_hourly (
    device_id          TEXT NOT NULL,
    model              TEXT NOT NULL,
    version            TEXT NOT NULL,
    role               TEXT NOT NULL,
    hour               TEXT NOT NULL,              -- ISO 8601 UTC, minutes and seconds zero
    windows            INTEGER NOT NULL,
    seconds            REAL NOT NULL,
    requests           INTEGER NOT NULL,
    errors             INTEGER NOT NULL,
    timeouts           INTEGER NOT NULL,
    fallbacks          INTEGER NOT NULL,
    latency_counts     TEXT NOT NULL,
    batches            INTEGER NOT NULL,
    batch_rows         INTEGER NOT NULL,
    outcomes           INTEGER NOT NULL,
    outcome_successes  INTEGER NOT NULL,
    compared           INTEGER NOT NULL,
    agreements         INTEGER NOT NULL,
    PRIMARY KEY (device_id, model, version, role, hour)
);
CREATE INDEX metrics_hourly_by_version ON metrics_hourly (model, version, hour);
CREATE INDEX metrics_hourly_by_hour ON metrics_hourly (hour);  -- retention deletes by hour

CREATE TABLE drift_hourly (
    device_id  TEXT NOT NULL,
    model      TEXT NOT NULL,
    version    TEXT NOT NULL,
    role       TEXT NOT NULL,
    hour       TEXT NOT NULL,
    windows    INTEGER NOT NULL,
    rows       INTEGER NOT NULL,
    features   TEXT NOT NULL,
    outputs    TEXT NOT NULL,
    PRIMARY KEY (device_id, model, version, role, hour)
);
CREATE INDEX drift_hourly_by_version ON drift_hourly (model, version, hour);
CREATE INDEX drift_hourly_by_hour ON drift_hourly (hour);
"""

# Drift alerts: raised when fleet-wide or per-group PSI crosses a threshold, cleared when it
# falls back; one open alert per (model, version, scope, kind, feature): a feature and an output
# may share a name.
_DRIFT_ALERTS = """
CREATE TABLE drift_alerts (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    model        TEXT NOT NULL,
    version      TEXT NOT NULL,
    scope        TEXT NOT NULL,                    -- 'fleet' or 'group:<name>'
    feature      TEXT NOT NULL,                    -- a feature or output name of the profile
    kind         TEXT NOT NULL,                    -- feature | output
    level        TEXT NOT NULL,                    -- warn | alert
    psi          REAL NOT NULL,
    js           REAL,
    threshold    REAL NOT NULL,
    rows         INTEGER NOT NULL,                 -- rows the PSI was computed from
    raised_at    TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    cleared_at   TEXT
);
CREATE UNIQUE INDEX drift_alerts_open ON drift_alerts (model, version, scope, kind, feature)
    WHERE cleared_at IS NULL;
"""

# Index 0 is migration 1. Each entry is SQL run as one script inside a transaction.
MIGRATIONS: tuple[str, ...] = (_INITIAL, _TELEMETRY, _DRIFT_ALERTS)
