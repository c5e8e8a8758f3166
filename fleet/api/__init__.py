"""The fleet's REST API (FastAPI): models, devices, rollouts, audit log and API tokens."""

from __future__ import annotations

from fleet.api.app import create_api
from fleet.api.bootstrap import ADMIN_TOKEN_FILE, bootstrap_admin_token
from fleet.api.context import RolloutControl
from fleet.api.errors import ERROR_STATUS

__all__ = [
    "ADMIN_TOKEN_FILE",
    "ERROR_STATUS",
    "RolloutControl",
    "bootstrap_admin_token",
    "create_api",
]
