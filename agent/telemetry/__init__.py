"""Telemetry of the agent: what each model version did per window (counts, latency, batches,
outcomes) and how its inputs and outputs drifted from the bundle's reference bins.

The serving path feeds :mod:`agent.telemetry.collector` without knowing whether anything
reports the windows; counting for drift happens off the request path (:mod:`.drift`).
"""
