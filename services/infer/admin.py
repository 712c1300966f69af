"""AdapterAdminService: the adapter registry, Triton's loaded adapters and the rollout (live,
shadow, canary, promotion, rollback), each change an AdapterEvent."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from knowstream.events.v1 import events_pb2
from knowstream.infer.v1 import infer_pb2, infer_pb2_grpc
from services.common.adapters import (
    BASE,
    MODES,
    AdapterInfo,
    Rollout,
    RolloutError,
)
from services.common.auth import caller
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.kafka import new_header
from services.infer.answerer import Answerer
from services.infer.settings import InferSettings
from services.infer.upload import check_dir, import_dir_files, new_staging, receive, remove_staging
from services.llm.triton import (
    TritonRejected,
)

log = logging.getLogger(__name__)


def _rollout_proto(r: Rollout) -> infer_pb2.RolloutState:
    return infer_pb2.RolloutState(
        live=r.live,
        candidate=r.candidate,
        mode=r.mode,
        shadow_share=r.shadow_share,
        canary_share=r.canary_share,
        version=r.version,
        updated_at_ms=r.updated_at_ms,
        history=r.history,
    )


def _aliases(adapter_id: str, r: Rollout) -> list[str]:
    names = []
    if r.live == adapter_id:
        names.append("live")
    if r.candidate == adapter_id:
        names.append("candidate")
        if r.mode in ("shadow", "canary"):
            names.append(r.mode)
    return names


class AdapterAdminServicer(infer_pb2_grpc.AdapterAdminServiceServicer):
    def __init__(self, answerer: Answerer, settings: InferSettings):
        self.registry = answerer.registry
        self.llm = answerer.llm
        self.events = answerer.events
        self.settings = settings
        # What Triton said it holds, from its last control reply.
        self.known_loaded: set[str] = set()

    async def _resolve(self, name: str) -> str:
        return await self.registry.resolve(name)  # UnknownAdapter: NOT_FOUND

    async def _loaded(self) -> set[str]:
        try:
            self.known_loaded = set((await self.llm.control("list", timeout_s=5)).get("loaded", []))
        except Exception as exc:
            # A busy Triton answers control calls after the batch it runs: report what it said
            # last rather than "nothing loaded".
            log.info("Triton did not list its adapters (%s); using its last answer", exc)
        return self.known_loaded

    async def _load(
        self, adapter_id: str, context: grpc.aio.ServicerContext, force: bool = False
    ) -> dict[str, Any]:
        if adapter_id == BASE:
            return {"load_s": 0.0, "loaded": sorted(self.known_loaded)}
        if adapter_id in self.known_loaded and not force:
            # A control call waits for the batch Triton is running; skipping it keeps a flip
            # instant. Should Triton have evicted it since, the engine reloads it on first use.
            return {"load_s": 0.0, "loaded": sorted(self.known_loaded)}
        try:
            reply = await self.llm.control("load", adapter_id)
        except TritonRejected as exc:
            raise TritonRejected(f"Triton refused: {exc}") from exc
        self.known_loaded = set(reply.get("loaded", []))
        return reply

    def _event(self, action: str, adapter_id: str, r: Rollout | None, reason: str = "") -> None:
        event = events_pb2.AdapterEvent(
            header=new_header("infer"),
            action=action,
            adapter_id=adapter_id,
            reason=reason,
            actor=caller(),
        )
        if r is not None:
            event.live, event.candidate, event.mode = r.live, r.candidate, r.mode
            event.share = r.canary_share if r.mode == "canary" else r.shadow_share
            event.rollout_version = r.version
        self.events.publish(self.settings.topic_adapters, adapter_id or "-", event)

    def _status(self, info: AdapterInfo, r: Rollout, loaded: set[str]) -> infer_pb2.AdapterStatus:
        return infer_pb2.AdapterStatus(
            id=info.id,
            base_model=info.base_model,
            rank=info.rank,
            alpha=info.alpha,
            target_modules=info.target_modules,
            size_bytes=info.size_bytes,
            created_at_ms=info.created_at_ms,
            source=info.source,
            parent=info.parent,
            description=info.description,
            lineage_json=json.dumps(info.lineage, sort_keys=True),
            aliases=_aliases(info.id, r),
            loaded=info.id in loaded,
        )

    async def ListAdapters(
        self, request: infer_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> infer_pb2.ListAdaptersResponse:
        r = await self.registry.rollout()
        loaded = await self._loaded()
        infos = await self.registry.list()
        return infer_pb2.ListAdaptersResponse(
            adapters=[self._status(i, r, loaded) for i in infos], rollout=_rollout_proto(r)
        )

    async def GetAdapter(
        self, request: infer_pb2.GetAdapterRequest, context: grpc.aio.ServicerContext
    ) -> infer_pb2.AdapterStatus:
        adapter_id = await self._resolve(request.adapter)
        if adapter_id == BASE:
            raise InvalidArgument("'base' is the model itself")
        info = await self.registry.get(adapter_id)
        if info is None:
            raise NotFound(f"unknown adapter {adapter_id}")
        assert info is not None
        return self._status(info, await self.registry.rollout(), await self._loaded())

    async def RegisterAdapter(
        self, request: infer_pb2.RegisterAdapterRequest, context: grpc.aio.ServicerContext
    ) -> infer_pb2.AdapterStatus:
        async def stage(staging: Path) -> infer_pb2.UploadAdapterInfo:
            # Only from inside the import directory: regular files, capped (importdir.py).
            s = self.settings
            await asyncio.to_thread(
                import_dir_files, request.path, s.import_root(), staging, s.adapter_max_bytes
            )
            return infer_pb2.UploadAdapterInfo(
                description=request.description, parent=request.parent, load=request.load
            )

        return await self._register(stage, context)

    async def UploadAdapter(
        self,
        request_iterator: AsyncIterator[infer_pb2.UploadAdapterChunk],
        context: grpc.aio.ServicerContext,
    ) -> infer_pb2.AdapterStatus:
        async def stage(staging: Path) -> infer_pb2.UploadAdapterInfo:
            return await receive(request_iterator, staging, self.settings.adapter_max_bytes)

        return await self._register(stage, context)

    async def _register(
        self,
        stage: Callable[[Path], Awaitable[infer_pb2.UploadAdapterInfo]],
        context: grpc.aio.ServicerContext,
    ) -> infer_pb2.AdapterStatus:
        """Stages the files privately, checks them, and only then stores and registers."""
        staging = await asyncio.to_thread(new_staging, self.settings.adapter_dir)
        try:
            meta = await stage(staging)
            await asyncio.to_thread(check_dir, staging)
            info, new = await self.registry.register(
                staging,
                parent=meta.parent,
                description=meta.description,
                lineage={"registered_by": caller()},
            )
        except ValueError as exc:  # ImportPathError, AdapterRejected
            raise InvalidArgument(str(exc)) from exc
        finally:
            await asyncio.to_thread(remove_staging, staging)
        if new:
            self._event("registered", info.id, None)
        if meta.load:
            await self._load(info.id, context)
            self._event("loaded", info.id, None)
        return self._status(info, await self.registry.rollout(), await self._loaded())

    async def LoadAdapter(
        self, request: infer_pb2.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> infer_pb2.LoadAdapterResponse:
        adapter_id = await self._resolve(request.adapter)
        reply = await self._load(adapter_id, context, force=True)
        self._event("loaded", adapter_id, None)
        return infer_pb2.LoadAdapterResponse(
            adapter_id=adapter_id, load_s=float(reply.get("load_s", 0)), loaded=reply["loaded"]
        )

    async def UnloadAdapter(
        self, request: infer_pb2.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> infer_pb2.LoadAdapterResponse:
        adapter_id = await self._resolve(request.adapter)
        r = await self.registry.rollout()
        if adapter_id in (r.live, r.candidate):
            raise FailedPrecondition(
                f"{adapter_id} is {' and '.join(_aliases(adapter_id, r))}; change the rollout first"
            )
        reply = await self.llm.control("unload", adapter_id)  # or TritonUnavailable
        self.known_loaded = set(reply.get("loaded", []))
        self._event("unloaded", adapter_id, r)
        return infer_pb2.LoadAdapterResponse(adapter_id=adapter_id, loaded=reply["loaded"])

    async def SetRollout(
        self, request: infer_pb2.SetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> infer_pb2.RolloutState:
        mode = request.mode or "off"
        previous = await self.registry.rollout()
        if mode not in MODES:
            raise InvalidArgument(f"mode must be one of {', '.join(MODES)}")
        adapter_id = ""
        if mode != "off":
            adapter_id = await self._resolve(request.adapter)
            await self._load(adapter_id, context)  # before any traffic is sent to it
        share = request.share if request.HasField("share") else None
        try:
            await self.registry.set_candidate(
                adapter_id,
                mode,
                shadow_share=share if mode == "shadow" else None,
                canary_share=share if mode == "canary" else None,
            )
        except RolloutError as exc:
            raise InvalidArgument(str(exc)) from exc
        r = await self.registry.rollout()
        if mode == "off" and previous.candidate and request.reason:
            # A candidate turned off with a reason (the rollout policy, or a person) is retired.
            self._event("retired", previous.candidate, r, request.reason)
        else:
            self._event("candidate", adapter_id, r, request.reason)
        return _rollout_proto(r)

    async def Promote(
        self, request: infer_pb2.PromoteRequest, context: grpc.aio.ServicerContext
    ) -> infer_pb2.RolloutState:
        current = await self.registry.rollout()
        target = await self._resolve(request.adapter) if request.adapter else ""
        if not target and not current.candidate:
            raise FailedPrecondition("no candidate to promote; name an adapter")
        # Load first: the flip itself is one Redis write, and the first request after it must
        # not wait for weights.
        await self._load(target or current.candidate, context)
        await self.registry.promote(target)  # RolloutError: FAILED_PRECONDITION
        r = await self.registry.rollout()
        self._event("promoted", r.live, r, request.reason)
        return _rollout_proto(r)

    async def Rollback(
        self, request: infer_pb2.RollbackRequest, context: grpc.aio.ServicerContext
    ) -> infer_pb2.RolloutState:
        current = await self.registry.rollout()
        if not current.history:
            raise FailedPrecondition("nothing to roll back to")
        await self._load(current.history[0], context)
        await self.registry.rollback()  # RolloutError: FAILED_PRECONDITION
        r = await self.registry.rollout()
        self._event("rolled_back", r.live, r, request.reason)
        return _rollout_proto(r)

    async def GetRollout(
        self, request: infer_pb2.GetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> infer_pb2.RolloutState:
        return _rollout_proto(await self.registry.rollout())
