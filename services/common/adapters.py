"""LoRA adapter store and registry.

The store is a directory: ``<adapter_dir>/<id>/{adapter_config.json,adapter_model.safetensors}``
where ``id`` is a hash of the adapter's content, so the same weights always get the same id and
a stored adapter never changes. The registry's metadata, the aliases and the rollout state live
in Redis:

- ``<prefix>:adapter:<id>``: hash of metadata (base model, rank, source, parent, lineage JSON...)
- ``<prefix>:adapters``: sorted set of ids by registration time
- ``<prefix>:rollout``: hash {live, candidate, mode (off|shadow|canary), shadow_share,
  canary_share, version, updated_at_ms}; one hash, so a flip is one atomic write
- ``<prefix>:rollout:history``: earlier live adapters, newest first (what rollback restores)
- ``<prefix>:adapter:<id>:questions``: the questions an adapter was trained on (a list, written
  with its registration), the monitor's reference when it compares live traffic with them

Trainer and infer service both use this module; the Triton model only reads the store.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from services.common.errors import FailedPrecondition, NotFound
from services.common.redisutil import text
from services.common.settings import CommonSettings

BASE = "base"
MODES = ("off", "shadow", "canary")
ALIASES = ("live", "shadow", "canary", "candidate", BASE)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class UnknownAdapter(NotFound):
    pass


class RolloutError(FailedPrecondition, ValueError):
    pass


@dataclass
class AdapterInfo:
    id: str
    base_model: str = ""
    rank: int = 0
    alpha: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    size_bytes: int = 0
    created_at_ms: int = 0
    source: str = ""  # "manual", "trainer", "random" ...
    parent: str = ""
    description: str = ""
    # Free-form lineage and evaluation data (dataset hash, offsets, metrics...), JSON.
    lineage: dict[str, Any] = field(default_factory=dict)

    def to_redis(self) -> dict[str, str]:
        data = asdict(self)
        data["target_modules"] = json.dumps(self.target_modules)
        data["lineage"] = json.dumps(self.lineage, sort_keys=True)
        return {k: str(v) for k, v in data.items()}

    @classmethod
    def from_redis(cls, raw: dict[Any, Any]) -> AdapterInfo:
        d = {text(k): text(v) for k, v in raw.items()}
        return cls(
            id=d["id"],
            base_model=d.get("base_model", ""),
            rank=int(d.get("rank", 0) or 0),
            alpha=float(d.get("alpha", 0) or 0),
            target_modules=json.loads(d.get("target_modules", "[]") or "[]"),
            size_bytes=int(d.get("size_bytes", 0) or 0),
            created_at_ms=int(d.get("created_at_ms", 0) or 0),
            source=d.get("source", ""),
            parent=d.get("parent", ""),
            description=d.get("description", ""),
            lineage=json.loads(d.get("lineage", "{}") or "{}"),
        )


@dataclass
class Rollout:
    live: str = BASE
    candidate: str = ""
    mode: str = "off"
    shadow_share: float = 0.0
    canary_share: float = 0.0
    version: int = 0
    updated_at_ms: int = 0
    history: list[str] = field(default_factory=list)

    def resolve_alias(self, name: str) -> str | None:
        """The adapter id an alias names now, BASE, or None when the alias is unset."""
        if name == BASE:
            return BASE
        if name == "live":
            return self.live or BASE
        if name == "candidate":
            return self.candidate or None
        if name in ("shadow", "canary"):
            return self.candidate if self.mode == name and self.candidate else None
        raise KeyError(name)


def content_id(source: Path) -> str:
    """Hash of the adapter's weights and its config (canonical JSON), 16 hex digits."""
    digest = hashlib.sha256()
    config = json.loads((source / "adapter_config.json").read_text(encoding="utf-8"))
    digest.update(json.dumps(config, sort_keys=True).encode())
    with open(source / "adapter_model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def store_adapter(source: Path, adapter_dir: Path) -> tuple[str, Path]:
    """Copies a peft adapter directory into the store under its content id."""
    missing = [f for f in ADAPTER_FILES if not (source / f).is_file()]
    if missing:
        raise ValueError(f"{source} is not a peft adapter directory: missing {', '.join(missing)}")
    adapter_id = content_id(source)
    target = adapter_dir / adapter_id
    if not (target / "adapter_model.safetensors").exists():
        adapter_dir.mkdir(parents=True, exist_ok=True)
        tmp = adapter_dir / f".{adapter_id}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        for name in ADAPTER_FILES:
            shutil.copyfile(source / name, tmp / name)
        try:
            tmp.rename(target)
        except OSError:  # stored concurrently by someone else: same content
            shutil.rmtree(tmp, ignore_errors=True)
    return adapter_id, target


def describe(path: Path) -> dict[str, Any]:
    config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    modules = config.get("target_modules") or []
    return {
        "base_model": str(config.get("base_model_name_or_path") or ""),
        "rank": int(config.get("r") or 0),
        "alpha": float(config.get("lora_alpha") or 0),
        "target_modules": sorted(modules) if isinstance(modules, list) else [str(modules)],
        "size_bytes": (path / "adapter_model.safetensors").stat().st_size,
    }


_PROMOTE = """
local target = ARGV[1]
local candidate = redis.call('HGET', KEYS[1], 'candidate') or ''
if target == '' then target = candidate end
if target == '' then return redis.error_reply('no candidate to promote') end
local live = redis.call('HGET', KEYS[1], 'live') or 'base'
if live ~= target then
  redis.call('LPUSH', KEYS[2], live)
  redis.call('LTRIM', KEYS[2], 0, 99)
end
redis.call('HSET', KEYS[1], 'live', target, 'updated_at_ms', ARGV[2])
if candidate == target then
  redis.call('HSET', KEYS[1], 'candidate', '', 'mode', 'off')
end
return redis.call('HINCRBY', KEYS[1], 'version', 1)
"""

_ROLLBACK = """
local previous = redis.call('LPOP', KEYS[2])
if not previous then return redis.error_reply('nothing to roll back to') end
redis.call('HSET', KEYS[1], 'live', previous, 'updated_at_ms', ARGV[1])
return redis.call('HINCRBY', KEYS[1], 'version', 1)
"""

_SET_CANDIDATE = """
redis.call('HSET', KEYS[1], 'candidate', ARGV[1], 'mode', ARGV[2], 'updated_at_ms', ARGV[5])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'shadow_share', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'canary_share', ARGV[4]) end
return redis.call('HINCRBY', KEYS[1], 'version', 1)
"""


class AdapterRegistry:
    def __init__(self, client: aioredis.Redis, settings: CommonSettings):
        self.redis = client
        self.settings = settings
        self.adapter_dir = settings.adapter_dir
        self.rollout_key = settings.key("rollout")
        self.history_key = settings.key("rollout", "history")
        self.index_key = settings.key("adapters")
        self._promote = client.register_script(_PROMOTE)
        self._rollback = client.register_script(_ROLLBACK)
        self._set_candidate = client.register_script(_SET_CANDIDATE)

    def _key(self, adapter_id: str) -> str:
        return self.settings.key("adapter", adapter_id)

    async def register(
        self,
        source: Path,
        *,
        source_kind: str = "manual",
        parent: str = "",
        description: str = "",
        lineage: dict[str, Any] | None = None,
        training_questions: Sequence[str] = (),
    ) -> tuple[AdapterInfo, bool]:
        """Stores and registers an adapter; returns its info and whether it was new. The
        questions it was trained on, if any, are kept with it (replacing earlier ones: the same
        weights registered again were trained on the same data)."""
        # Copying and hashing the weights is file work: off the event loop.
        adapter_id, path = await asyncio.to_thread(store_adapter, Path(source), self.adapter_dir)
        existing = await self.get(adapter_id)
        if existing is not None:
            if training_questions:
                await self._keep_questions(adapter_id, training_questions)
            return existing, False
        info = AdapterInfo(
            id=adapter_id,
            created_at_ms=int(time.time() * 1000),
            source=source_kind,
            parent=parent,
            description=description,
            lineage=lineage or {},
            **await asyncio.to_thread(describe, path),
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(adapter_id), mapping=info.to_redis())  # type: ignore[arg-type]
            pipe.zadd(self.index_key, {adapter_id: info.created_at_ms})
            await pipe.execute()
        if training_questions:
            await self._keep_questions(adapter_id, training_questions)
        return info, True

    async def _keep_questions(self, adapter_id: str, questions: Sequence[str]) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._questions_key(adapter_id))
            pipe.rpush(self._questions_key(adapter_id), *questions)
            await pipe.execute()

    async def training_questions(self, adapter_id: str, limit: int) -> list[str]:
        """Up to ``limit`` of the questions ``adapter_id`` was trained on (none recorded: [])."""
        key = self._questions_key(adapter_id)
        raw: list[Any] = await self.redis.lrange(key, 0, limit - 1)  # type: ignore[misc]
        return [text(q) for q in raw]

    def _questions_key(self, adapter_id: str) -> str:
        return self.settings.key("adapter", adapter_id, "questions")

    async def get(self, adapter_id: str) -> AdapterInfo | None:
        raw = await self.redis.hgetall(self._key(adapter_id))  # type: ignore[misc]
        return AdapterInfo.from_redis(raw) if raw else None

    async def list(self) -> list[AdapterInfo]:
        members: list[Any] = await self.redis.zrange(self.index_key, 0, -1)
        async with self.redis.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.hgetall(self._key(text(member)))
            rows: list[Any] = await pipe.execute()
        return [AdapterInfo.from_redis(row) for row in rows if row]

    async def rollout(self) -> Rollout:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.rollout_key)
            pipe.lrange(self.history_key, 0, 19)
            replies: list[Any] = await pipe.execute()
        raw: dict[Any, Any] = replies[0]
        history: list[Any] = replies[1]
        d = {text(k): text(v) for k, v in raw.items()}
        return Rollout(
            live=d.get("live") or BASE,
            candidate=d.get("candidate", ""),
            mode=d.get("mode") or "off",
            shadow_share=float(d.get("shadow_share") or self.settings.rollout_shadow_share),
            canary_share=float(d.get("canary_share") or self.settings.rollout_canary_share),
            version=int(d.get("version") or 0),
            updated_at_ms=int(d.get("updated_at_ms") or 0),
            history=[text(h) for h in history],
        )

    async def resolve(self, name: str, rollout: Rollout | None = None) -> str:
        """An alias or adapter id -> the adapter id (or BASE) it names now."""
        name = name.strip() or "live"
        if name in ALIASES:
            rollout = rollout or await self.rollout()
            resolved = rollout.resolve_alias(name)
            if resolved is None:
                raise UnknownAdapter(f"alias {name!r} is not set (rollout mode is {rollout.mode})")
            return resolved
        if not await self.redis.exists(self._key(name)):
            raise UnknownAdapter(f"unknown adapter {name!r} (not registered)")
        return name

    async def set_candidate(
        self,
        adapter_id: str,
        mode: str,
        shadow_share: float | None = None,
        canary_share: float | None = None,
    ) -> int:
        if mode not in MODES:
            raise RolloutError(f"mode must be one of {', '.join(MODES)}")
        for share in (shadow_share, canary_share):
            if share is not None and not 0 <= share <= 1:
                raise RolloutError("shares are fractions in [0, 1]")
        if mode != "off" and adapter_id in ("", BASE):
            raise RolloutError("a shadow or canary candidate must be a registered adapter")
        return int(
            await self._set_candidate(
                keys=[self.rollout_key],
                args=[
                    adapter_id if mode != "off" else "",
                    mode,
                    "" if shadow_share is None else str(shadow_share),
                    "" if canary_share is None else str(canary_share),
                    str(int(time.time() * 1000)),
                ],
            )
        )

    async def promote(self, adapter_id: str = "") -> int:
        try:
            return int(
                await self._promote(
                    keys=[self.rollout_key, self.history_key],
                    args=[adapter_id, str(int(time.time() * 1000))],
                )
            )
        except aioredis.ResponseError as exc:
            raise RolloutError(str(exc)) from exc

    async def rollback(self) -> int:
        try:
            return int(
                await self._rollback(
                    keys=[self.rollout_key, self.history_key],
                    args=[str(int(time.time() * 1000))],
                )
            )
        except aioredis.ResponseError as exc:
            raise RolloutError(str(exc)) from exc


def create_random_adapter(
    model_dir: Path, out_dir: Path, *, rank: int = 8, seed: int = 0, scale: float = 0.02
) -> Path:
    """A LoRA adapter with random A and B matrices for the given base model: a smoke-test and
    benchmark tool (it changes the model's outputs without training)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu")
    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, scale)
    peft_model.peft_config["default"].base_model_name_or_path = str(model_dir)
    peft_model.save_pretrained(str(out_dir))
    return out_dir
