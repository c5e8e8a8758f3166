"""Structured logs: one JSON object per line with the record's fields, or the same as text."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from edgefleet.logs import configure_logging


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_extra_fields(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info", "json")
    log = logging.getLogger("agent.test")
    log.info("model loaded", extra={"model": "digits", "device": "CPU"})
    log.debug("not shown at info")
    log.info("server", extra={"color_message": "\x1b[36mserver\x1b[0m"})
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["msg"] == "model loaded" and first["level"] == "info"
    assert first["model"] == "digits" and first["device"] == "CPU"
    assert first["logger"] == "agent.test" and first["ts"].endswith("+00:00")
    assert "color_message" not in json.loads(lines[1])


def test_text_lines_and_exceptions(
    root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("debug", "text")
    log = logging.getLogger("agent.test")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", extra={"model": "digits"})
    err = capsys.readouterr().err
    assert "error   agent.test: failed  model=digits" in err
    assert "ValueError: boom" in err
