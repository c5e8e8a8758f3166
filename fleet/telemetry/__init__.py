"""Telemetry from the devices, taken in and put to use: ingest, fleet drift, drift alerts and
the series the console charts."""
