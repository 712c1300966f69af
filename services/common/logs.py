"""Structured logging: one JSON object per line, so the run directory's logs can be grepped and
shipped as they are."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from services.common.auth import CALLER
from services.common.tracing import current_trace_id

_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED})
        # Who the RPC being served is for (the token's name), so a log line says who did it.
        if who := CALLER.get():
            entry.setdefault("caller", who)
        # The trace of the call or records being handled: grep a trace id across the logs.
        if trace_id := current_trace_id():
            entry.setdefault("trace_id", trace_id)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Client libraries are chatty at INFO (every rebalance, every metadata refresh).
    for noisy in ("aiokafka", "kafka", "faust", "mode", "httpx", "urllib3", "transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
