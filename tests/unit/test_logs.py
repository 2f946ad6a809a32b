"""Log set-up: JSON lines at the configured level, below it nothing at all."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import structlog
from litestar.types import Receive, Scope, Send

from almanac.app import RequestIdMiddleware
from almanac.logs import configure_logging
from almanac.settings import LogSettings


def lines(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_lines_below_the_level_are_dropped_before_any_processing(
    restored: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    configure_logging(LogSettings(level="INFO", format="json"))
    stamped: list[str] = []
    stamper = structlog.processors.TimeStamper.__call__

    def counting(self: object, logger: object, name: str, event: dict[str, object]) -> object:
        stamped.append(str(event["event"]))
        return stamper(self, logger, name, event)  # type: ignore[arg-type]

    monkeypatch.setattr(structlog.processors.TimeStamper, "__call__", counting)
    log = structlog.get_logger("almanac.test")
    log.debug("test.quiet", position=1)
    log.info("test.said", position=2)
    assert stamped == ["test.said"]
    [line] = lines(capsys.readouterr().out)
    assert line["event"] == "test.said"
    assert line["level"] == "info"
    assert line["logger"] == "almanac.test"
    assert line["position"] == 2


def fail() -> None:
    raise ZeroDivisionError("boom")


def test_an_exception_is_logged_with_its_traceback(
    restored: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(LogSettings(level="WARNING", format="json"))
    log = structlog.get_logger("almanac.test").bind(correlation_id="c-1")
    try:
        fail()
    except ZeroDivisionError:
        log.exception("test.failed")
    log.info("test.below_warning")
    [line] = lines(capsys.readouterr().out)
    assert line["event"] == "test.failed"
    assert line["level"] == "error"
    assert line["correlation_id"] == "c-1"
    assert "ZeroDivisionError: boom" in str(line["exception"])


class URL:
    """A URL object, as some libraries log one."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


def test_an_api_key_in_a_websocket_url_never_reaches_the_log(
    restored: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """uvicorn logs each handshake's path with its query, where a browser's key is."""
    configure_logging(LogSettings(level="INFO", format="json"))
    handshakes = logging.getLogger("uvicorn.error")
    handshakes.info(
        '%s - "WebSocket %s" [accepted]', "127.0.0.1:5000", "/ws?after=3&key=alm_secret1&topics=x"
    )
    handshakes.info('%s - "WebSocket %s" 403', "127.0.0.1:5001", "/ws/readings/r-1?key=alm_secret2")
    # The key in the format string, or in an argument that is no string.
    handshakes.info("%s?key=%s", "/ws", "alm_secret3")
    handshakes.info("GET %s", URL("/ws?key=alm_secret4"))
    out = capsys.readouterr()
    said = [str(line["event"]) for line in lines(out.out)]
    assert said == [
        '127.0.0.1:5000 - "WebSocket /ws?after=3&key=[redacted]&topics=x" [accepted]',
        '127.0.0.1:5001 - "WebSocket /ws/readings/r-1?key=[redacted]" 403',
        "/ws?key=[redacted]",
        "GET /ws?key=[redacted]",
    ]
    assert "alm_secret" not in out.out + out.err


def test_a_bad_logging_call_is_reported_by_logging_with_its_key_blanked(
    restored: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not raised into the library that made it, as logging never does."""
    configure_logging(LogSettings(level="INFO", format="json"))
    secret = "alm_" + "secret5"  # not in this file as one string: the report shows the call
    lib = logging.getLogger("lib")
    lib.warning("bad %s %s", f"/ws?key={secret}")
    lib.warning("bad %(u)s %(v)d", {"u": f"/ws?key={secret}", "v": "x"})
    lib.warning("bad %s %s", URL(f"/ws?key={secret}"))
    out = capsys.readouterr()
    assert out.err.count("Logging error") == 3
    assert "key=[redacted]" in out.err
    assert secret not in out.out + out.err


def test_every_line_written_while_a_request_is_served_names_its_request_id(
    restored: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Almanac's lines and libraries' alike; none after the request, and a line that names
    its own ``request_id`` keeps it."""
    configure_logging(LogSettings(level="INFO", format="json"))
    log = structlog.get_logger("almanac.test")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        log.info("test.inside")
        logging.getLogger("lib").warning("library line")
        log.info("test.own", request_id="other")

    async def serve_two() -> None:
        # In one task, as requests on one connection may be: nothing of the first may
        # be left for the line between them, nor for the second.
        for request_id in (b"trace-9", b"trace-10"):
            scope = {"type": "http", "headers": [(b"x-request-id", request_id)], "state": {}}
            await RequestIdMiddleware(app)(scope, None, None)  # type: ignore[arg-type]
            log.info("test.between")

    asyncio.run(serve_two())
    said = [(str(line["event"]), line.get("request_id")) for line in lines(capsys.readouterr().out)]
    assert said == [
        ("test.inside", "trace-9"),
        ("library line", "trace-9"),
        ("test.own", "other"),
        ("test.between", None),
        ("test.inside", "trace-10"),
        ("library line", "trace-10"),
        ("test.own", "other"),
        ("test.between", None),
    ]
