"""Application-log formats shared by every long-running verb: `text` (default) or `json`.

JSON lines carry the access log's timestamp format (`2026-12-02T13:03:21.432Z`, UTC,
milliseconds), so one ingestion rule (Loki, Vector, Fluent Bit) fits both logs:
`{"time", "level", "logger", "message", "pid"}` plus `exc` when an exception is logged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def iso_millis(ts: float) -> str:
    """`2026-12-02T13:03:21.432Z`: the access log's `time` format."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": iso_millis(record.created), "level": record.levelname, "logger": record.name,
                "message": record.getMessage(), "pid": record.process}
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"), default=str)


def add_log_format_arg(parser: argparse.ArgumentParser) -> None:
    """`--log-format text|json` (default: $KVGATE_LOG_FORMAT, else unset so a config file may decide)."""
    parser.add_argument("--log-format", choices=FORMATS, default=os.environ.get("KVGATE_LOG_FORMAT") or None,
                        help="application log format: text or json (one object per line, ISO-8601 UTC times)")


def configure_logging(level: str, fmt: str | None = "text", text_format: str = TEXT_FORMAT) -> None:
    """Log to stderr at `level` in `fmt`; may be called again (e.g. once the config is read)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(text_format))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
