"""aiohttp's and asyncio's own log records go through the proxy's JSON lines (proxy/observability/logs.py)."""

from __future__ import annotations

import io
import logging

import orjson
import pytest
import structlog
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from proxy.observability import logs


@pytest.fixture
def json_lines():
    """The process's log set-up writing to a buffer; the loggers it touches are put back after."""
    saved = {name: (lg.handlers[:], lg.level, lg.propagate)
             for name in ("aiohttp", "asyncio") for lg in [logging.getLogger(name)]}
    buffer = io.StringIO()
    logs.configure("info", "json", stream=buffer)
    logs.route_library_logs("info")
    logs.route_library_logs("info")  # twice, as a reload of the set-up would: still one line per record
    yield lambda: [orjson.loads(line) for line in buffer.getvalue().splitlines()]
    structlog.reset_defaults()
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def bad_request(error: Exception) -> None:
    try:
        raise error
    except Exception as exc:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "10.0.0.7", exc_info=exc)


def test_a_malformed_request_is_one_line_saying_what_was_wrong_not_what_was_sent(json_lines):
    bad_request(BadHttpMessage("Invalid header value char:\n\n  b'Authorization: Bearer se\\x01cret'\n   ^"))
    bad_request(LineTooLong("b'GET /fx/a?api_key=secret-in-the-line'", 8190))
    lines = json_lines()
    assert [(line["level"], line["kind"], line["error"], line["status"]) for line in lines] == [
        ("warning", "bad_request", "BadHttpMessage", 400), ("warning", "bad_request", "LineTooLong", 400)]
    assert [line["detail"] for line in lines] == ["Invalid header value char", "Got more than 8190 bytes when reading: …."]
    assert all(line["event"] == "Error handling request from 10.0.0.7" for line in lines)
    assert "secret" not in orjson.dumps(lines).decode() and "exception" not in lines[0]


def test_other_errors_keep_their_traceback_in_one_line_with_secrets_masked(json_lines):
    logs.REDACTOR.add_secrets({"pk-LIVE-library-9d1e"})
    try:
        raise RuntimeError("the handler broke near pk-LIVE-library-9d1e")
    except RuntimeError:
        logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=True)
    logging.getLogger("aiohttp.web").info("aiohttp says %s", "hello")
    logging.getLogger("aiohttp.internal").debug("below the level: not written")
    error, info = json_lines()
    assert (error["logger"], error["level"], error["event"]) == ("asyncio", "error", "Task exception was never retrieved")
    assert "Traceback" in error["exception"] and "RuntimeError: the handler broke near ***" in error["exception"]
    assert (info["logger"], info["level"], info["event"]) == ("aiohttp.web", "info", "aiohttp says hello")
