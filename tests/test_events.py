"""Named log events (common/events.py): logfmt text that ``grep event=`` and a logfmt parser
read back, JSON lines for log stores, and ``--log-format json`` through a real agent process."""

from __future__ import annotations

import io
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from fedprune.common.events import JsonFormatter, emit

BIN = Path(sys.executable).parent


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("fedprune.test_events")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        yield log, stream, handler
    finally:
        log.removeHandler(handler)


def test_logfmt_quotes_what_would_split_a_value(logger) -> None:
    log, stream, _ = logger
    emit(log, logging.INFO, "round_declined", round=3, reason="data_mismatch: 13 features", quote='say "hi"',
         empty="", eq="a=b", plain="too_hot", ratio=0.123456789, shape=[1, 8, 8], ok=True, none=None)
    assert stream.getvalue() == (
        'event=round_declined round=3 reason="data_mismatch: 13 features" quote="say \\"hi\\"" empty="" '
        'eq="a=b" plain=too_hot ratio=0.123457 shape=1,8,8 ok=True none=None\n')


def test_an_event_below_the_level_is_not_rendered(logger) -> None:
    log, stream, _ = logger
    log.setLevel(logging.INFO)

    class Loud:
        def __str__(self) -> str:
            raise AssertionError("rendered")

    emit(log, logging.DEBUG, "quiet", value=Loud())
    assert stream.getvalue() == ""


def test_json_lines_carry_the_event_its_fields_and_an_iso_time(logger) -> None:
    log, stream, handler = logger
    handler.setFormatter(JsonFormatter())
    emit(log, logging.WARNING, "no_task_yet", waited_s=300, bundle=Path("/etc/fedprune/bundle.json"),
         note='is the "coordinator" running?', time="a field named like a key of the record")
    log.info("plain %s message", "library")
    try:
        raise OSError(28, "No space left on device")
    except OSError as exc:
        emit(log, logging.ERROR, "checkpoint_failed", round=4, error=exc)
        log.exception("boom")
    first, plain, failed, boom = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first["event"] == "no_task_yet" and first["level"] == "WARNING" and first["logger"] == "fedprune.test_events"
    assert first["waited_s"] == 300 and first["bundle"] == "/etc/fedprune/bundle.json"
    assert first["note"] == 'is the "coordinator" running?'
    # a field cannot overwrite the record's own keys
    assert first["time"].endswith("Z") and time.strptime(first["time"][:19], "%Y-%m-%dT%H:%M:%S")
    assert plain["event"] == "log" and plain["message"] == "plain library message"
    assert failed["event"] == "checkpoint_failed" and failed["round"] == 4 and "No space" in failed["error"]
    assert boom["event"] == "log" and "OSError" in boom["exception"]


def test_the_agent_logs_json_lines_with_log_format_json(tmp_path: Path) -> None:
    """A real ``fedprune-agent --log-format json run`` against a broker nobody answers: every line
    it writes to stderr, from start to SIGTERM, is one JSON object with an event name."""
    from tests.edge_agent.test_clear_errors import write_agent

    config = write_agent(tmp_path)
    os.chmod(tmp_path / "bundle.json", 0o644)  # a warning the bundle loader logs
    agent = subprocess.Popen([str(BIN / "fedprune-agent"), "--log-format", "json", "run", "--config", str(config)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        selector = selectors.DefaultSelector()
        selector.register(agent.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        while not any('"event": "start"' in line for line in lines) and time.monotonic() < deadline:
            if selector.select(timeout=1.0):
                line = agent.stderr.readline()
                if not line:
                    break
                lines.append(line)
        agent.send_signal(signal.SIGTERM)
        _, rest = agent.communicate(timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    lines += rest.splitlines()
    assert agent.returncode == 0, "".join(lines)[-3000:]
    events = [json.loads(line) for line in lines if line.strip()]
    names = [e["event"] for e in events]
    assert {"bundle_permissions", "start", "mqtt_closed", "stopped"} <= set(names), names
    start = events[names.index("start")]
    assert start["device"] == "dev-0" and start["federation"] == "fed1" and start["level"] == "INFO"
    warning = events[names.index("bundle_permissions")]
    assert warning["level"] == "WARNING" and warning["fix"].startswith("chmod 600 ")
