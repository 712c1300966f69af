"""Agents written as faust agents (an ``async for`` over a stream), run on the one consumer
plumbing of :mod:`services.common.consumer`.

The trainer's agents (services/trainer/service.py) are written against faust's API:
``app.topic(...)``, ``app.agent(topic)(fn)``, ``stream.events()`` / ``stream.take_events(n,
within)``, ``event.message`` and :func:`dead_letter`. This module keeps that API, so those
agents run unchanged, but under it there is no faust any more: faust kept its own committed
offsets in memory and skipped every record at or below them, so after the memory-only broker
restarted (every log at 0 again) a faust agent skipped the new log's first hundreds of records.
Here each agent is fed by a :class:`StreamConsumer` and gets what every consumer gets: log-reset
detection, per-partition lag, stall health, and isolation of a record that keeps failing. An
agent that raises on a record is started again on that same record; when it has failed
``stream_retries`` + 1 times, the record goes to the dead-letter topic with the error and the
agent goes on with the next one.

A record counts as done when the agent asks for the next one (faust's rule: the ``async for``
body has finished with it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiokafka import ConsumerRecord

from services.common.consumer import Handler, StreamConsumer, attach_stream
from services.common.kafka import DeadLetterSink, make_producer
from services.common.redisutil import connect
from services.common.settings import CommonSettings
from services.common.tracing import on_trace, trace_of_record
from services.common.tracing import use as use_trace

log = logging.getLogger(__name__)

AgentFn = Callable[[Any], Awaitable[None]]


class StreamHealth:
    """The last error an agent raised (part of the stream's status). Whether the stream is
    healthy is decided by the plumbing: a crash is retried and isolated, it does not by itself
    take the service out of service."""

    def __init__(self) -> None:
        self.crashed_at: float | None = None
        self.last_error = ""
        self.started = asyncio.Event()

    def crashed(self, exc: BaseException) -> None:
        self.crashed_at = time.monotonic()
        self.last_error = repr(exc)

    def healthy(self, window_s: float = 15.0) -> bool:
        return self.started.is_set()


class Event:
    """faust's event: ``.message`` has topic, partition, offset, key, value, headers."""

    def __init__(self, record: ConsumerRecord):
        self.message = record
        self.key = record.key
        self.value = record.value


class _Stream:
    def __init__(self, agent: _Agent):
        self.agent = agent

    async def events(self) -> AsyncIterator[Event]:
        async for batch in self.take_events(1, 0):
            yield batch[0]

    async def take_events(self, max_: int, within: float = 0) -> AsyncIterator[list[Event]]:
        # ``within`` is moot: a poll hands over what has arrived.
        while True:
            records, done = await self.agent.inbox.get()
            self.agent.current = done
            # The agent runs in a task of its own: its records' trace is set here, not by the
            # plumbing (agents take one record at a time).
            use_trace(on_trace(trace_of_record(records[0])))
            yield [Event(r) for r in records]
            self.agent.current = None
            if not done.done():
                done.set_result(None)


class _Agent:
    """One agent function and the task running it; :meth:`feed` hands it records and returns
    once it has finished them, or raises what it raised on them."""

    def __init__(self, name: str, fn: AgentFn, batch: int):
        self.name = name
        self.fn = fn
        self.batch = batch
        self.inbox: asyncio.Queue[tuple[list[ConsumerRecord], asyncio.Future[None]]] = (
            asyncio.Queue(maxsize=1)
        )
        self.current: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None

    def _ensure_running(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self.fn(_Stream(self)))
            self.task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        error: BaseException = RuntimeError(f"agent {self.name} returned")
        if task.cancelled():
            error = asyncio.CancelledError()
        elif task.exception() is not None:
            error = task.exception()  # type: ignore[assignment]
        if self.current is not None and not self.current.done():
            self.current.set_exception(error)
        self.current = None

    async def feed(self, records: list[ConsumerRecord]) -> None:
        for start in range(0, len(records), self.batch):
            self._ensure_running()
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            await self.inbox.put((records[start : start + self.batch], done))
            await done

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


class TopicRef:
    def __init__(self, app: StreamApp, name: str):
        self.app = app
        self.name = name

    def get_topic_name(self) -> str:
        return self.name


class StreamApp:
    """What faust.App offered the agents: topics, agents, and a producer for dead letters."""

    def __init__(self, settings: CommonSettings, group_id: str):
        self.settings = settings
        self.group_id = group_id
        self.producer = make_producer(settings, group_id)
        self.agents: dict[str, _Agent] = {}

    def topic(self, name: str, **_: Any) -> TopicRef:
        return TopicRef(self, name)

    def agent(self, topic: TopicRef, name: str | None = None, concurrency: int = 1) -> Any:
        if concurrency != 1:
            raise ValueError("agents run one at a time per topic (partition order)")

        def register(fn: AgentFn) -> AgentFn:
            if topic.name in self.agents:
                raise ValueError(f"a second agent for topic {topic.name}")
            self.agents[topic.name] = _Agent(name or fn.__name__, fn, batch=1)
            return fn

        return register

    def handlers(self) -> dict[str, Handler]:
        async def handle(records: list[ConsumerRecord]) -> None:
            await self.agents[records[0].topic].feed(records)

        return {topic: handle for topic in self.agents}


def make_faust_app(settings: CommonSettings, group_id: str) -> Any:
    """A :class:`StreamApp` under its old name, so the agents written for faust need no edit.
    Typed ``Any`` for the same reason: their modules annotate it as ``faust.App``."""
    return StreamApp(settings, group_id)


async def dead_letter(dlq: TopicRef, message: ConsumerRecord, reason: str, consumer: str) -> Any:
    """Sends a consumed record to its dead-letter topic with the reason and waits for the
    broker's ack; returns an awaitable (faust returned the send future) that is already done."""
    sink = DeadLetterSink(dlq.app.producer, dlq.app.settings, consumer)
    await sink.send_record(message, reason)
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done


def attach(app: Any, stream_app: Any, health: StreamHealth, name: str) -> None:
    """Runs the agents of ``stream_app`` (a :class:`StreamApp`; ``Any`` because callers annotate
    it as faust.App) inside the service's GrpcApp: the producer starts first, then the consumer
    of every agent's topic (one group member), with the readiness check ``name``."""
    stream = StreamConsumer(
        stream_app.settings,
        app.name,
        stream_app.group_id,
        stream_app.handlers(),
        producer=stream_app.producer,
        redis=connect(stream_app.settings.redis_url),
        # Agents take records one at a time; a small poll keeps a failed batch's record-by-
        # record replay short.
        max_records=16,
    )

    async def start() -> None:
        await stream_app.producer.start()
        health.started.set()

    async def stop() -> None:
        for agent in stream_app.agents.values():
            await agent.stop()
        await stream_app.producer.stop()
        if stream.redis is not None:
            await stream.redis.aclose()

    app.on_start(start)
    app.on_stop(stop)
    attach_stream(app, stream, name)
