"""JSON application logs: one object per line, the access log's timestamp format."""

from __future__ import annotations

import json
import logging
import re

from filters.access_log import _iso
from kvkernel.logfmt import JsonFormatter, iso_millis

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_json_line_fields_and_timestamp_match_the_access_log() -> None:
    record = logging.LogRecord("kvgate.serve", logging.WARNING, __file__, 1, "port %d busy", (8888,), None)
    record.created = 1_796_000_000.4321
    line = json.loads(JsonFormatter().format(record))
    assert line == {"time": "2026-11-30T00:53:20.432Z", "level": "WARNING", "logger": "kvgate.serve",
                    "message": "port 8888 busy", "pid": record.process}
    assert STAMP.match(line["time"]) and line["time"] == _iso(record.created)


def test_exceptions_are_kept_inside_the_json_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = JsonFormatter().format(record)
    assert "\n" not in text and "ValueError: boom" in json.loads(text)["exc"]
    assert iso_millis(0.5) == "1970-01-01T00:00:00.500Z"


def test_mlx_serve_takes_log_format(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    from mlxd.server import parse_args

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        parse_args(["--model", str(tiny_model_dir), "--log-format", "json"])
        assert [type(h.formatter) for h in root.handlers] == [JsonFormatter]
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
