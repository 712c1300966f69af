"""The live monitor: accepts questions into the log, slides windows over it, applies the decision
policy, and publishes windows and decisions through an outbox.

All state is in Redis (store.py); this object holds only the loaded reference. Window
computation is serialised by a lock (one process computes windows; more monitor processes would
share the log but must not compute concurrently, which the Redis lease prevents).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from knowstream.events.v1 import events_pb2
from services.common import tracing
from services.common.kafka import BadEvent, new_header, parse_event, parse_knowledge_event
from services.common.metrics import DRIFT_MMD2, DRIFT_P_VALUE, DRIFT_WINDOW
from services.monitor.drift import Reference
from services.monitor.policy import Decision, DriftPolicy, PolicyState
from services.monitor.settings import MonitorSettings
from services.monitor.store import LogEntry, MonitorStore, OutboxRecord
from services.monitor.windowing import (
    build_reference,
    compute_window,
    cover_gap,
    decision_event,
    new_gap,
    parse_inference,
    policy_config,
    top_dense_score,
)

log = logging.getLogger(__name__)

Publish = Callable[[str, str, bytes], Awaitable[None]]
LiveAdapter = Callable[[], Awaitable[str]]


@dataclass
class LoadedReference:
    id: str
    info: dict[str, Any]
    reference: Reference

    @property
    def dimension(self) -> int:
        return int(self.reference.embeddings.shape[1])


class Monitor:
    def __init__(
        self,
        settings: MonitorSettings,
        store: MonitorStore,
        publish: Publish,
        live_adapter: LiveAdapter,
    ):
        self.settings = settings
        self.store = store
        self.publish = publish
        self.live_adapter = live_adapter
        self.reference: LoadedReference | None = None
        self.step = settings.monitor_step or settings.monitor_window
        self._lock = asyncio.Lock()
        # Gap coverage updates are read-modify-write of the gaps hash.
        self._gap_lock = asyncio.Lock()

    async def start(self) -> None:
        loaded = await self.store.load_reference()
        if loaded is not None:
            info, reference = loaded
            self.reference = LoadedReference(info["id"], info, reference)
            log.info("reference %s loaded (%d questions)", info["id"], len(reference.texts))
        await self.flush_outbox()
        await self.advance()

    # -- input ------------------------------------------------------------------------------
    async def accept_inference(self, value: bytes | None) -> bool:
        """Validates an inference event and appends its question to the log (False: a
        duplicate, evaluation traffic, or a request without retrieval, which has no query
        embedding). Raises BadEvent for what belongs in the dead-letter topic."""
        dimension = self.reference.dimension if self.reference else None
        event = parse_inference(value, self.settings.embed_model, dimension)
        if event is None or event.caller in self.settings.monitor_ignore_callers:
            return False
        entry = LogEntry(
            entry_id="",
            request_id=event.request_id,
            question=event.question,
            embedding=np.asarray(event.query_embedding, dtype=np.float32),
            top_score=top_dense_score(event),
            # Generated answers without a confidence (0) carry no signal.
            confidence=event.confidence if event.confidence > 0 else None,
            at_ms=event.header.produced_at_ms,
        )
        dedup = event.request_id or event.header.event_id
        return await self.store.accept(f"inference:{dedup}", entry) is not None

    async def accept_shadow(self, value: bytes | None) -> bool:
        event = parse_event(value, events_pb2.ShadowPairEvent)
        if event.shadow_error:
            return False  # a failed mirror says nothing about agreement
        return await self.store.add_signals(
            f"shadow:{event.request_id or event.header.event_id}",
            {"shadow_pairs": 1, "shadow_agreement": event.agreement},
        )

    async def accept_feedback(self, value: bytes | None) -> bool:
        event = parse_event(value, events_pb2.FeedbackEvent)
        if event.rating not in (-1, 0, 1):
            raise BadEvent(f"feedback rating {event.rating} is not -1, 0 or 1")
        return await self.store.add_signals(
            f"feedback:{event.header.event_id}",
            {"feedback": 1, "feedback_negative": float(event.rating < 0)},
        )

    async def accept_chunks(self, values: list[bytes | None]) -> int:
        """Newly embedded chunks: how far they cover the open knowledge gaps' questions.
        Records that are not embedded chunks are skipped (retrieve dead-letters bad ones)."""
        vectors = []
        for value in values:
            try:
                event = parse_knowledge_event(value)
            except BadEvent:
                continue
            if event.WhichOneof("kind") == "embedded" and event.embedded.vector:
                vectors.append(np.asarray(event.embedded.vector, dtype=np.float32))
        if not vectors:
            return 0
        by_dim: dict[int, list[np.ndarray]] = {}
        for v in vectors:
            by_dim.setdefault(len(v), []).append(v)
        async with self._gap_lock:
            gaps = [g for g in await self.store.gaps() if not g["closed_ms"]]
            now = int(time.time() * 1000)
            changed = []
            closing: list[OutboxRecord] = []
            for gap in gaps:
                for group in by_dim.values():
                    if cover_gap(
                        gap,
                        np.stack(group),
                        self.settings.monitor_gap_score,
                        self.settings.monitor_gap_share,
                        now,
                    ):
                        changed.append(gap)
                if gap["closed_ms"]:
                    log.info("knowledge gap %s closed by ingested documents", gap["key"])
                    closing.append(await self._learn_closed_gap(gap, now))
            await self.store.save_gaps(list({g["key"]: g for g in changed}.values()), closing)
        if closing:
            await self.flush_outbox()
        return len(vectors)

    async def _learn_closed_gap(self, gap: dict[str, Any], now_ms: int) -> OutboxRecord:
        """A gap closed by new documents asks the trainer to learn them: a RetrainRequested
        whose idempotency key is the gap's, so a replay asks once."""
        key = f"{gap['key']}:closed"
        event = events_pb2.RetrainRequested(
            header=new_header("monitor", tracing.new_trace().trace_id),  # as a drift decision
            idempotency_key=key,
            reason=(
                f"knowledge gap {gap['key']} closed by newly ingested documents: "
                "learn what they brought"
            ),
            example_questions=list(gap["questions"])[:16],
            live_adapter=await self.live_adapter(),
            from_ms=int(gap["created_ms"]),
            to_ms=now_ms,
        )
        return OutboxRecord(self.settings.topic_retrain, key, event.SerializeToString())

    # -- reference --------------------------------------------------------------------------
    async def set_reference(
        self,
        embeddings: np.ndarray,
        texts: list[str],
        source: str,
        description: str = "",
        restart_windows: bool = False,
    ) -> dict[str, Any]:
        """Builds and stores a new reference. Windows go on from where they are, or with
        ``restart_windows`` from the next question that arrives, with a fresh policy state."""
        info, reference = await self._build(embeddings, texts, source, description)
        async with self._lock:
            cursor = None
            if restart_windows:
                latest = await self.store.latest_entries(1)
                cursor = latest[0].entry_id if latest else "0-0"
            await self._store_reference(info, reference, cursor, fresh=restart_windows)
        return info

    async def _build(
        self, embeddings: np.ndarray, texts: list[str], source: str, description: str
    ) -> tuple[dict[str, Any], Reference]:
        ref_id, reference = await asyncio.to_thread(
            build_reference, embeddings, texts, self.settings
        )
        info = {
            "id": ref_id,
            "source": source,
            "description": description,
            "size": len(reference.texts),
            "dimension": int(reference.embeddings.shape[1]),
            "embedding_model": self.settings.embed_model,
            "created_ms": int(time.time() * 1000),
            "sigma2": reference.sigma2,
            "topics": len(reference.centroids),
        }
        return info, reference

    async def _store_reference(
        self, info: dict[str, Any], reference: Reference, cursor: str | None, fresh: bool = False
    ) -> None:
        """Under the lock. The policy's streak starts again; its cooldown stays unless
        ``fresh`` (a new reference right after an event should not re-trigger at once)."""
        old = PolicyState.from_dict((await self.store.state()).policy)
        policy = PolicyState(cooldown_until=-1 if fresh else old.cooldown_until, events=old.events)
        await self.store.save_reference(info, reference, cursor, policy.to_dict())
        self.reference = LoadedReference(info["id"], info, reference)
        log.info(
            "reference %s set from %s (%d questions)", info["id"], info["source"], info["size"]
        )

    async def _auto_reference(self) -> bool:
        """Under the lock: the first questions seen become the reference, and windows start
        after them."""
        n = self.settings.monitor_auto_reference
        if n == 0:
            return False
        state = await self.store.state()
        entries = await self.store.entries_after(state.cursor, n)
        if len(entries) < n:
            return False
        info, reference = await self._build(
            np.stack([e.embedding for e in entries]),
            [e.question for e in entries],
            "auto",
            f"the first {n} questions the monitor saw",
        )
        await self._store_reference(info, reference, cursor=entries[-1].entry_id)
        return True

    # -- windows ----------------------------------------------------------------------------
    async def advance(self) -> list[events_pb2.DriftWindow]:
        """Computes every window the log holds enough questions for; returns them."""
        done: list[events_pb2.DriftWindow] = []
        async with self._lock:
            while True:
                if self.reference is None and not await self._auto_reference():
                    break
                window = await self._next_window()
                if window is None:
                    break
                done.append(window)
        if done:
            await self.flush_outbox()
        return done

    async def _next_window(self) -> events_pb2.DriftWindow | None:
        assert self.reference is not None
        size = self.settings.monitor_window
        state = await self.store.state()
        entries = await self.store.entries_after(state.cursor, size)
        if len(entries) < size:
            return None
        ref = self.reference
        signals = await self.store.snapshot_signals()
        index = state.next_window
        record, result = await asyncio.to_thread(
            compute_window,
            ref.reference,
            ref.id,
            index,
            [e.question for e in entries],
            np.stack([e.embedding for e in entries]),
            [e.top_score for e in entries],
            [e.confidence for e in entries],
            [e.arrived_ms for e in entries],
            signals,
            self.settings,
        )
        DRIFT_P_VALUE.set(record.p_value)
        DRIFT_MMD2.set(record.mmd2)
        DRIFT_WINDOW.set(record.index)
        policy = DriftPolicy(
            policy_config(self.settings), ref.id, PolicyState.from_dict(state.policy)
        )
        decision = policy.observe(result)
        outbox = [
            OutboxRecord(
                self.settings.topic_drift_windows,
                f"{ref.id}:{index}",
                record.SerializeToString(),
            )
        ]
        event_bytes, gap = None, None
        if decision is not None:
            record_out, event_bytes, gap = await self._decided(decision, entries, ref)
            outbox.append(record_out)
        await self.store.commit_window(
            cursor=entries[min(self.step, size) - 1].entry_id,
            next_window=index + 1,
            policy=policy.state.to_dict(),
            window=record.SerializeToString(),
            event=event_bytes,
            outbox=outbox,
            history=self.settings.monitor_history,
            gap=gap,
        )
        log.info(
            "window %d: mmd2=%.5f p=%.3f kl_topics=%.3f drift=%s",
            index,
            record.mmd2,
            record.p_value,
            record.kl_topics,
            record.drift,
        )
        return record

    async def _decided(
        self, decision: Decision, entries: list[LogEntry], ref: LoadedReference
    ) -> tuple[OutboxRecord, bytes, dict[str, Any] | None]:
        """A window's decision as its outbox record (RetrainRequested or KnowledgeGap), the
        whole DriftEvent, and for a gap the poorly retrieved questions it tracks."""
        event = decision_event(decision, ref.id, await self.live_adapter(), self.settings)
        kind = event.WhichOneof("kind")
        inner = getattr(event, kind)
        topic = (
            self.settings.topic_retrain
            if kind == "retrain_requested"
            else self.settings.topic_knowledge_gaps
        )
        gap = None
        if kind == "knowledge_gap":
            poor = [
                e
                for e in entries
                if e.top_score is not None and e.top_score < self.settings.monitor_gap_score
            ]
            # The evidence may all be in earlier windows of the streak: then the gap has no
            # questions to follow (it is reported, not tracked).
            gap = new_gap(
                decision.idempotency_key,
                [e.question for e in poor],
                np.stack([e.embedding for e in poor])
                if poor
                else np.zeros((0, ref.reference.embeddings.shape[1]), np.float32),
                [e.top_score or 0.0 for e in poor],
                int(time.time() * 1000),
            )
        log.warning(
            "drift decision: %s",
            kind,
            extra={"idempotency_key": decision.idempotency_key, "reason": inner.reason},
        )
        record = OutboxRecord(topic, decision.idempotency_key, inner.SerializeToString())
        return record, event.SerializeToString(), gap

    async def flush_outbox(self) -> int:
        records = await self.store.outbox()
        # Windows before decisions, in window order, so a consumer sees the evidence first.
        records.sort(key=lambda r: (r.topic != self.settings.topic_drift_windows, r.key))
        for record in records:
            await self.publish(record.topic, record.key, record.value)
            await self.store.sent(record)
        return len(records)
