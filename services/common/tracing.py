"""W3C trace context (``traceparent``), by hand: one ingest or one Ask can be followed through
every RPC and every event it caused.

The current trace lives in a context variable. It is set

* by the server interceptor (services/common/grpcserver.py) from the ``traceparent`` metadata of
  each call, or to a new trace when the caller sent none;
* by the consumer plumbing (services/common/consumer.py) from the ``traceparent`` header of the
  records a handler gets, when they share one trace;

and read by the client interceptors (services/common/clients.py: calls to other services carry
it), by :class:`services.common.kafka.TracingProducer` (every record gets the header), by
``new_header`` (``EventHeader.trace_id``) and by the JSON log formatter (``trace_id``).

Format (https://www.w3.org/TR/trace-context/): ``00-<32 hex trace id>-<16 hex span id>-<2 hex
flags>``. Span ids are only made fresh per hop; there are no span timings (no tracing backend
here), so the trace id is what ties things together: ``knowstream trace ID`` finds it on the
topics.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any

TRACEPARENT = "traceparent"
_HEX = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class TraceContext:
    trace_id: str
    span_id: str
    flags: str = "01"

    def header(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def child(self) -> TraceContext:
        """The same trace, one hop further (the caller's span is this one's parent)."""
        return TraceContext(self.trace_id, _new_id(8), self.flags)


def _new_id(nbytes: int) -> str:
    while True:
        value = os.urandom(nbytes).hex()
        if value.strip("0"):  # all zeros is invalid
            return value


def _valid_id(value: str, length: int) -> bool:
    return len(value) == length and bool(_HEX.match(value)) and bool(value.strip("0"))


def new_trace() -> TraceContext:
    return TraceContext(_new_id(16), _new_id(8))


def valid_trace_id(value: str) -> bool:
    return _valid_id(value, 32)


def parse_traceparent(value: str | bytes | None) -> TraceContext | None:
    """The context of a ``traceparent`` value, or None when it is absent or malformed (the
    spec's rule: a receiver that cannot parse it starts a new trace)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not value:
        return None
    parts = value.strip().split("-")
    if len(parts) < 4:
        return None
    version, trace_id, span_id, flags = parts[:4]
    if len(version) != 2 or not _HEX.match(version) or version == "ff":
        return None
    # Version 00 has exactly four fields; a later version may append more (ignored here).
    if version == "00" and len(parts) != 4:
        return None
    if not (_valid_id(trace_id, 32) and _valid_id(span_id, 16)):
        return None
    if len(flags) != 2 or not _HEX.match(flags):
        return None
    return TraceContext(trace_id, span_id, flags)


_current: ContextVar[TraceContext | None] = ContextVar("ks_trace", default=None)


def current() -> TraceContext | None:
    return _current.get()


def current_trace_id() -> str:
    ctx = _current.get()
    return ctx.trace_id if ctx else ""


@contextmanager
def continued(trace_id: str) -> Iterator[None]:
    """Work done later for a request (a training job, a rollout decision) under the trace the
    request came with: one hop further in that trace, or the current one if ``trace_id`` is not
    a valid id."""
    ctx = current()
    token = use(TraceContext(trace_id, _new_id(8)) if valid_trace_id(trace_id) else ctx)
    try:
        yield
    finally:
        restore(token)


def use(ctx: TraceContext | None) -> Token[TraceContext | None]:
    """Makes ``ctx`` the current trace (in this task's context); reset with :func:`restore`."""
    return _current.set(ctx)


def restore(token: Token[TraceContext | None]) -> None:
    _current.reset(token)


def _get(pairs: Iterable[tuple[str, Any]] | None) -> Any:
    for key, value in pairs or ():
        if key.lower() == TRACEPARENT:
            return value
    return None


def from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> TraceContext | None:
    """The caller's context from gRPC metadata (or Kafka headers: both are (key, value) pairs)."""
    return parse_traceparent(_get(metadata))


def server_context(metadata: Iterable[tuple[str, Any]] | None) -> TraceContext:
    """What a server handles a call under: the caller's trace one hop further, or a new one."""
    caller = from_metadata(metadata)
    return caller.child() if caller else new_trace()


def outgoing_metadata(metadata: Iterable[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    """Metadata of an outgoing call: the current trace added unless the caller set one."""
    pairs = list(metadata or ())
    ctx = _current.get()
    if ctx is not None and _get(pairs) is None:
        pairs.append((TRACEPARENT, ctx.child().header()))
    return pairs


def on_trace(trace_id: str) -> TraceContext | None:
    """A new hop of the trace ``trace_id`` (None when it is not a valid trace id)."""
    return TraceContext(trace_id, _new_id(8)) if valid_trace_id(trace_id) else None


def kafka_headers(trace_id: str = "") -> list[tuple[str, bytes]]:
    """The ``traceparent`` record header for ``trace_id`` (else the current trace); none when
    there is no valid trace id."""
    current = _current.get()
    ctx = on_trace(trace_id) or (current.child() if current else None)
    return [(TRACEPARENT, ctx.header().encode())] if ctx else []


def with_trace_header(headers: Iterable[tuple[str, bytes]] | None) -> list[tuple[str, bytes]]:
    """Record headers with the current trace added unless they carry one."""
    pairs = list(headers or ())
    return pairs if _get(pairs) is not None else pairs + kafka_headers()


def trace_of_record(record: Any) -> str:
    """The trace id in a consumed record's headers ("" when none)."""
    ctx = from_metadata(getattr(record, "headers", None))
    return ctx.trace_id if ctx else ""
