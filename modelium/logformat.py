"""The server's log lines: ``text`` (the default) or ``json``, one JSON object per line.

A JSON line holds ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger`` and ``message``,
plus ``exception`` (the formatted traceback) when the record carries one and ``stack`` when it
carries a stack. Non-ASCII characters are escaped, so that a line never holds a character that
some reader takes for a line break (U+2028, U+0085...).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger (stderr) at ``level`` in ``fmt`` (``text`` or ``json``). With
    ``json``, Python's warnings are logged too, so that they come as JSON lines as well."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    if fmt == "json":
        logging.captureWarnings(True)
