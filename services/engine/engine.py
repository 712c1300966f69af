"""The LLM engine: one copy of the base weights, any number of LoRA adapters, batched
generation with per-request parameters, and a score mode.

It runs inside Triton's python backend (deploy/triton/llm/1/model.py is a thin wrapper around
it) and, for tests and the overhead benchmark, in-process. The forward passes, the KV cache and
the adapters' weights belong to a runtime (services/engine/runtimes: transformers or llama.cpp,
``KS_ENGINE_RUNTIME``); validation, the adapter LRU, sampling, stop strings, streaming,
cancellation and continuous batching are here, the same for every runtime.

Over 400 lines because the scheduler (admission, continuous batching) and the engine's prepare,
prefill, decode and score steps work on the same request and batch state.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.engine.runtimes import Runtime, create_runtime
from services.llm.chat import encode_prompt
from services.llm.llm import ADAPTER_ID, BASE, EngineError, LLMRequest, LLMResult

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(
        self,
        model_dir: str | Path,
        adapter_dir: str | Path,
        *,
        max_adapters: int = 8,
        max_prompt_tokens: int = 2048,
        max_new_tokens: int = 512,
        threads: int | None = None,
        runtime: str = "transformers",
        cache_dir: str | Path = ".cache",
        runtime_options: dict[str, Any] | None = None,
    ):
        from transformers import AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.model_dir = Path(model_dir)
        self.adapter_dir = Path(adapter_dir)
        self.max_adapters = max_adapters
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.runtime: Runtime = create_runtime(
            runtime,
            self.model_dir,
            cache_dir=Path(cache_dir),
            threads=threads,
            **(runtime_options or {}),
        )
        self.loaded: OrderedDict[str, float] = OrderedDict()  # adapter id -> last use (LRU)
        self.stop_ids = self._stop_token_ids()
        self.pad_id = next(iter(self.stop_ids)) if self.stop_ids else 0

    @property
    def base(self) -> Any:
        """The transformers runtime's base model (tests compare against it)."""
        return getattr(self.runtime, "base", None)

    # -- adapters ---------------------------------------------------------------------------
    def load_adapter(self, adapter_id: str, pinned: frozenset[str] = frozenset()) -> float:
        """Loads an adapter from the store; returns the seconds it took (0 if already loaded).
        ``pinned`` adapters (in use by running requests) are never evicted to make room."""
        if adapter_id in self.loaded:
            self.loaded.move_to_end(adapter_id)
            return 0.0
        if not ADAPTER_ID.match(adapter_id):
            raise EngineError(f"adapter id {adapter_id!r} is not a content-hash id")
        path = self.adapter_dir / adapter_id
        if not (path / "adapter_config.json").exists():
            raise EngineError(f"adapter {adapter_id} is not in the store ({path})")
        start = time.perf_counter()
        while len(self.loaded) >= self.max_adapters:
            evictable = [a for a in self.loaded if a not in pinned]
            if not evictable:
                raise EngineError(
                    f"all {self.max_adapters} adapter slots are in use by running requests"
                )
            self.loaded.pop(evictable[0])
            self.runtime.unload_adapter(evictable[0])
            log.info("evicted adapter %s (LRU, max %d)", evictable[0], self.max_adapters)
        try:
            self.runtime.load_adapter(adapter_id, path)
        except Exception as exc:
            raise EngineError(f"adapter {adapter_id} does not fit the base model: {exc}") from exc
        self.loaded[adapter_id] = time.monotonic()
        took = time.perf_counter() - start
        log.info("loaded adapter %s in %.3fs", adapter_id, took)
        return took

    def unload_adapter(self, adapter_id: str) -> bool:
        if adapter_id not in self.loaded:
            return False
        self.runtime.unload_adapter(adapter_id)
        del self.loaded[adapter_id]
        return True

    def loaded_adapters(self) -> list[str]:
        return list(self.loaded)

    # -- requests ---------------------------------------------------------------------------
    def prepare(
        self, request: LLMRequest, pinned: frozenset[str] = frozenset()
    ) -> tuple[list[int] | None, LLMResult]:
        """Validates a request, loads its adapter if needed and tokenises its prompt. Returns
        the prompt ids and the request's result, or None and a result carrying the error."""
        result = LLMResult(adapter=request.adapter)
        try:
            self._validate(request)
            if request.adapter != BASE:
                self.load_adapter(request.adapter, pinned)
                self.loaded.move_to_end(request.adapter)
            ids = self.encode_prompt(request)
            if len(ids) > self.max_prompt_tokens:
                raise EngineError(
                    f"prompt has {len(ids)} tokens; the limit is {self.max_prompt_tokens}"
                )
        except EngineError as exc:
            result.error, result.finish_reason = str(exc), "error"
            return None, result
        result.prompt_tokens = len(ids)
        return ids, result

    def run(self, requests: list[LLMRequest]) -> list[LLMResult]:
        """Serves one batch to completion (tests, benchmarks, in-process use). A bad request
        gets a result with ``error`` set; its neighbours are served."""
        results: list[LLMResult] = []
        batch = DecodeBatch(self)
        scores: list[tuple[LLMRequest, list[int], LLMResult]] = []
        admitted: list[tuple[LLMRequest, list[int], LLMResult]] = []
        for request in requests:
            ids, result = self.prepare(request, frozenset(r.adapter for r, _, _ in admitted))
            results.append(result)
            if ids is not None:
                (scores if request.candidates else admitted).append((request, ids, result))
        with torch.inference_mode():
            if admitted:
                batch.admit(admitted, lambda result: None)
                while batch.rows:
                    batch.step()
            if scores:
                self._score(
                    [r for r, _, _ in scores], [i for _, i, _ in scores], [x for _, _, x in scores]
                )
        return results

    def _validate(self, request: LLMRequest) -> None:
        if not request.prompt.strip():
            raise EngineError("empty prompt")
        if not 1 <= request.max_new_tokens <= self.max_new_tokens and not request.candidates:
            raise EngineError(
                f"max_new_tokens {request.max_new_tokens} is outside 1..{self.max_new_tokens}"
            )
        if request.temperature < 0 or not 0 < request.top_p <= 1:
            raise EngineError("temperature must be >= 0 and top_p in (0, 1]")
        if request.candidates and not all(c.strip() for c in request.candidates):
            raise EngineError("empty candidate answer")

    def encode_prompt(self, request: LLMRequest) -> list[int]:
        return encode_prompt(self.tokenizer, request.system, request.prompt, request.raw_prompt)

    def _stop_token_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = _generation_eos(self.model_dir)
        for value in eos if isinstance(eos, list) else [eos]:
            if value is not None:
                ids.add(int(value))
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        # Chat models end a turn with their own token, which GGUF metadata does not always name
        # as EOS (SmolLM2's says <|im_start|>).
        for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid >= 0:
                ids.add(tid)
        return ids

    # -- score mode -------------------------------------------------------------------------
    def _score(
        self, requests: list[LLMRequest], prompts: list[list[int]], results: list[LLMResult]
    ) -> None:
        """Log-probability of each candidate (sum over its tokens) after the prompt; the
        prompt runs once for all its candidates (services/common/scoring.py)."""
        start = time.perf_counter()
        cand_ids = [
            [list(self.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in r.candidates]
            for r in requests
        ]
        adapters = [r.adapter for r in requests]
        scores = self.runtime.score(prompts, cand_ids, adapters, self.pad_id)
        elapsed_ms = (time.perf_counter() - start) * 1000
        for qi, result in enumerate(results):
            result.batch_size = len(results)
            result.candidate_logprobs = scores[qi]
            best = max(range(len(scores[qi])), key=scores[qi].__getitem__)
            result.text = requests[qi].candidates[best]
            result.finish_reason = "score"
            result.mean_logprob = scores[qi][best]
            result.compute_ms = elapsed_ms


# Cancellation is polled (an IPC round trip inside Triton) every this many decode steps.
CANCEL_CHECK_STEPS = 4


@dataclass
class _Row:
    request: LLMRequest
    result: LLMResult
    on_done: Callable[[LLMResult], None]
    started: float
    generated: list[int] = field(default_factory=list)
    logprob_sum: float = 0.0
    text: str = ""
    emitted: int = 0
    # Chosen but not yet fed to the model.
    next_token: int = 0
    finished: bool = False


class DecodeBatch:
    """A running batch with iteration-level admission (continuous batching): new requests are
    prefilled and merged into the runtime's KV cache between decode steps, finished ones leave
    at once (the runtime frees their cache)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.rows: list[_Row] = []
        self.state = engine.runtime.new_batch(engine.pad_id)
        self.steps = 0

    @property
    def width(self) -> int:
        return self.state.width

    def admit(
        self,
        requests: list[tuple[LLMRequest, list[int], LLMResult]],
        on_done: Callable[[LLMResult], None] | list[Callable[[LLMResult], None]],
    ) -> None:
        """Prefills new requests together and merges them into the running batch."""
        callbacks = on_done if isinstance(on_done, list) else [on_done] * len(requests)
        now = time.perf_counter()
        logits = self.state.admit(
            [ids for _, ids, _ in requests], [r.adapter for r, _, _ in requests]
        )
        new_rows = [
            _Row(req, result, cb, now)
            for (req, _, result), cb in zip(requests, callbacks, strict=True)
        ]
        self.rows.extend(new_rows)
        for row in new_rows:
            row.result.batch_size = len(requests)
        self._choose(new_rows, logits)
        self._retire()

    def step(self) -> None:
        """Feeds every row its chosen token and chooses the next one."""
        if not self.rows:
            return
        logits = self.state.step(
            [row.next_token for row in self.rows], [row.request.adapter for row in self.rows]
        )
        for row in self.rows:
            row.result.batch_size = max(row.result.batch_size, len(self.rows))
        self.steps += 1
        self._choose(self.rows, logits)
        if self.steps % CANCEL_CHECK_STEPS == 0:
            for row in self.rows:
                if not row.finished and row.request.is_cancelled and row.request.is_cancelled():
                    row.finished, row.result.finish_reason = True, "cancelled"
                    row.result.error = "cancelled by the caller"
        self._retire()

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> None:
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        temps = torch.tensor([row.request.temperature for row in rows])
        top_ps = torch.tensor([row.request.top_p for row in rows])
        chosen = _pick(logits, temps, top_ps).tolist()
        for i, row in enumerate(rows):
            self._accept(row, int(chosen[i]), float(logprobs[i, chosen[i]]))

    def _accept(self, row: _Row, token: int, logprob: float) -> None:
        request = row.request
        if token in self.engine.stop_ids and not request.ignore_eos:
            row.finished, row.result.finish_reason = True, "stop"
            return
        row.generated.append(token)
        row.logprob_sum += logprob
        row.next_token = token
        # Decoding the whole row each step is only needed to find stop sequences or to stream.
        if request.stop or request.on_text is not None:
            row.text = str(self.engine.tokenizer.decode(row.generated, skip_special_tokens=True))
            cut = _find_stop(row.text, request.stop)
            if cut is not None:
                row.text = row.text[:cut]
                row.finished, row.result.finish_reason = True, "stop"
        if not row.finished and len(row.generated) >= request.max_new_tokens:
            row.finished, row.result.finish_reason = True, "length"
        if request.on_text is not None:
            # Hold back what could be the start of a stop sequence or half a multi-byte
            # character; the final flush sends the rest.
            hold = max((len(s) for s in request.stop), default=1) - 1
            safe = len(row.text) if row.finished else len(row.text) - hold
            while safe > row.emitted and row.text[safe - 1] == "\ufffd":
                safe -= 1
            if safe > row.emitted:
                request.on_text(row.text[row.emitted : safe])
                row.emitted = safe

    def _retire(self) -> None:
        done = [row for row in self.rows if row.finished]
        if not done:
            return
        keep = [i for i, row in enumerate(self.rows) if not row.finished]
        # Out of the rows before their callers hear: a caller's next request may arrive at once,
        # and the admission count (Scheduler.held) must not still hold the finished ones.
        self.rows = [self.rows[i] for i in keep]
        try:
            self.state.keep(keep)
        finally:
            for row in done:
                self._finish(row)

    def _finish(self, row: _Row) -> None:
        result, request = row.result, row.request
        if not (request.stop or request.on_text is not None):
            row.text = str(self.engine.tokenizer.decode(row.generated, skip_special_tokens=True))
        result.text = row.text
        result.completion_tokens = len(row.generated)
        result.mean_logprob = row.logprob_sum / max(1, len(row.generated))
        result.finish_reason = result.finish_reason or "length"
        result.compute_ms = (time.perf_counter() - row.started) * 1000
        if request.on_text is not None and len(row.text) > row.emitted:
            request.on_text(row.text[row.emitted :])
        row.on_done(result)


class SchedulerStats:
    """Time spent in decode steps and prefills, logged every ``every_s`` while busy."""

    def __init__(self, every_s: float = 30.0):
        self.every_s = every_s
        self._reset()

    def _reset(self) -> None:
        self.since = time.monotonic()
        self.totals: dict[str, list[float]] = {"step": [0, 0.0, 0], "prefill": [0, 0.0, 0]}

    def record(self, kind: str, seconds: float, rows: int) -> None:
        total = self.totals[kind]
        total[0] += 1
        total[1] += seconds
        total[2] += rows
        if time.monotonic() - self.since >= self.every_s:
            parts = []
            for name, (count, secs, n) in self.totals.items():
                if count:
                    parts.append(
                        f"{name}s {int(count)} ({secs * 1000 / count:.0f} ms, {n / count:.1f} rows)"
                    )
            busy = sum(t[1] for t in self.totals.values()) / (time.monotonic() - self.since)
            log.info("scheduler: %s; busy %.0f%%", ", ".join(parts), 100 * busy)
            self._reset()


class Scheduler:
    """Continuous batching around one engine: a thread owns the model and runs a
    :class:`DecodeBatch`; requests join it between decode steps (up to ``max_batch`` rows) and
    leave as soon as they finish. Score-mode requests and control operations run between steps.
    Triton's python model submits here and returns at once (decoupled responses)."""

    def __init__(
        self,
        engine: LLMEngine,
        max_batch: int,
        admit_window_s: float = 0.03,
        max_waiting: int | None = None,
        waiting_closed_s: float = 0.0,
    ):
        self.engine = engine
        self.max_batch = max(1, max_batch)
        # Requests held beyond a full batch (running + waiting <= max_batch + max_waiting); past
        # it try_submit refuses and the model answers "overloaded" at once. An admitted request
        # then waits for at most max_waiting slots to free.
        self.max_waiting = max(0, self.max_batch // 4 if max_waiting is None else max_waiting)
        # The waiting room closes for this long after a refusal. A request that waits, waits
        # for a slot of a batch that finishes together: under sustained overload the room is
        # always full and every admitted waiter's latency doubles (bench.overload, room always
        # open: steady p99 3.4-4.7 s against 1.9-2.0 s at capacity; closed: 2.2 against 1.6-1.9
        # s). Closed, only a free slot admits, while a burst at a quiet model finds the room.
        self.waiting_closed_s = waiting_closed_s
        self._refused_at = -float("inf")
        self._pruned_at = 0.0
        # Requests try_submit accepted and not yet answered: counted, not derived from the
        # queues, because a request moving between them (job queue, backlog, prefill, rows)
        # would be missed or counted twice by a reader on another thread.
        self._held = 0
        self._held_lock = threading.Lock()
        self.jobs: queue.Queue[tuple[str, Any, Any]] = queue.Queue()
        # Generation requests waiting for a slot, with their arrival time.
        self.backlog: deque[tuple[LLMRequest, Callable[[LLMResult], None], float]] = deque()
        self.admit_window_s = admit_window_s
        self.stats = SchedulerStats()
        self.batch = DecodeBatch(engine)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="llm-scheduler", daemon=True)
        self.thread.start()

    def submit(self, request: LLMRequest, on_done: Callable[[LLMResult], None]) -> None:
        # Answered once: a failed step answers every request it had taken (see _failing) and
        # some of them may have been answered already.
        self.jobs.put(("llm", request, _once(on_done)))

    def waiting(self) -> int:
        return self.jobs.qsize() + len(self.backlog)

    def held(self) -> int:
        """Requests accepted by try_submit and not yet answered (running, being prefilled or
        waiting)."""
        return self._held

    def room(self) -> int:
        """Requests that may be held now: a full batch, and the waiting room unless the model
        refused one within ``waiting_closed_s``."""
        closed = time.monotonic() - self._refused_at < self.waiting_closed_s
        return self.max_batch + (0 if closed else self.max_waiting)

    def try_submit(self, request: LLMRequest, on_done: Callable[[LLMResult], None]) -> bool:
        """Queues ``request`` unless ``room()`` requests are held already (False: the caller
        sheds it)."""
        with self._held_lock:
            if self._held >= self.room():
                self._refused_at = time.monotonic()
                return False
            self._held += 1

        def answered(result: LLMResult) -> None:  # called once (submit)
            # Released before the caller hears: its next request may arrive at once.
            with self._held_lock:
                self._held -= 1
            on_done(result)

        self.submit(request, answered)
        return True

    def _prune(self, every_s: float = 0.1) -> None:
        """Drops the waiting requests whose callers went away (each check is a call to Triton,
        hence at most every ``every_s``): a cancelled request is never prefilled."""
        now = time.monotonic()
        if not self.backlog or now - self._pruned_at < every_s:
            return
        self._pruned_at = now
        kept: deque[tuple[LLMRequest, Callable[[LLMResult], None], float]] = deque()
        for entry in self.backlog:
            if _cancelled(entry[0]):
                entry[1](_cancelled_result(entry[0]))
            else:
                kept.append(entry)
        if len(kept) < len(self.backlog):
            log.info("dropped %d cancelled requests", len(self.backlog) - len(kept))
            self.backlog = kept

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Runs ``fn`` on the model's thread between steps (adapter load/unload)."""
        future: Future[Any] = Future()
        self.jobs.put(("call", fn, future))
        return future

    def stop(self) -> None:
        self._stop.set()
        self.jobs.put(("stop", None, None))
        self.thread.join(30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as exc:  # fail the requests in flight, keep serving
                log.exception("scheduler step failed")
                for row in self.batch.rows:
                    row.result.error = _failure(exc)
                    row.on_done(row.result)
                try:  # frees the failed rows' cache (llama.cpp sequences are a fixed pool)
                    self.batch.state.keep([])
                except Exception:
                    log.exception("could not free the failed batch's cache")
                self.batch = DecodeBatch(self.engine)

    def _collect(
        self, timeout_s: float | None
    ) -> list[tuple[LLMRequest, Callable[[LLMResult], None]]]:
        """Takes every queued job (waiting up to ``timeout_s`` for the first one); runs control
        calls, queues generation requests, returns score requests."""
        scores: list[tuple[LLMRequest, Callable[[LLMResult], None]]] = []
        try:
            job = self.jobs.get(timeout=timeout_s) if timeout_s else self.jobs.get_nowait()
            while True:
                kind, payload, extra = job
                if kind == "stop":
                    self._stop.set()
                    break
                if kind == "call":
                    try:
                        extra.set_result(payload())
                    except Exception as exc:
                        extra.set_exception(exc)
                elif payload.candidates:
                    scores.append((payload, extra))
                else:
                    self.backlog.append((payload, extra, time.monotonic()))
                job = self.jobs.get_nowait()
        except queue.Empty:
            pass
        return scores

    def _admissible(self) -> bool:
        """Whether to prefill the waiting requests now. A prefill pauses the running rows, so
        arrivals are gathered for up to ``admit_window_s`` (or until they fill the free slots)
        and prefilled together: one prefill of 8 prompts costs about half of 8 single ones."""
        if not self.backlog:
            return False
        free = self.max_batch - len(self.batch.rows)
        waited = time.monotonic() - self.backlog[0][2]
        return free > 0 and (len(self.backlog) >= free or waited >= self.admit_window_s)

    def _window_left(self) -> float:
        return max(0.001, self.admit_window_s - (time.monotonic() - self.backlog[0][2]))

    def _tick(self) -> None:
        self._prune()
        if self.batch.rows:
            scores = self._collect(None)
        else:
            scores = self._collect(self._window_left() if self.backlog else 0.5)
        while not self.batch.rows and self.backlog and not self._admissible() and not scores:
            if self._stop.is_set():
                return
            scores += self._collect(self._window_left())
        if self._stop.is_set():
            return
        with torch.inference_mode():
            if scores:
                self._score(scores)
            if not self._admissible():
                if self.batch.rows:
                    start = time.perf_counter()
                    rows = len(self.batch.rows)
                    self.batch.step()
                    self.stats.record("step", time.perf_counter() - start, rows)
                return
            self._admit_waiting()

    def _admit_waiting(self) -> None:
        """Prefills waiting requests into the free slots."""
        admitted: list[tuple[LLMRequest, list[int], LLMResult]] = []
        callbacks: list[Callable[[LLMResult], None]] = []
        taken: list[tuple[LLMRequest, Callable[[LLMResult], None]]] = []
        in_use = {row.request.adapter for row in self.batch.rows}
        with _failing(taken):
            while self.backlog and len(self.batch.rows) + len(admitted) < self.max_batch:
                request, on_done, _ = self.backlog.popleft()
                taken.append((request, on_done))
                if _cancelled(request):  # its caller went away while it waited
                    on_done(_cancelled_result(request))
                    continue
                ids, result = self.engine.prepare(request, frozenset(in_use))
                if ids is None:
                    on_done(result)
                    continue
                in_use.add(request.adapter)
                admitted.append((request, ids, result))
                callbacks.append(on_done)
            if admitted:
                start = time.perf_counter()
                self.batch.admit(admitted, callbacks)
                self.stats.record("prefill", time.perf_counter() - start, len(admitted))

    def _score(self, jobs: list[tuple[LLMRequest, Callable[[LLMResult], None]]]) -> None:
        in_use = frozenset(row.request.adapter for row in self.batch.rows)
        ready: list[tuple[LLMRequest, list[int], LLMResult, Callable[[LLMResult], None]]] = []
        with _failing(jobs):
            for request, on_done in jobs:
                if _cancelled(request):
                    on_done(_cancelled_result(request))
                    continue
                ids, result = self.engine.prepare(request, in_use)
                if ids is None:
                    on_done(result)
                else:
                    ready.append((request, ids, result, on_done))
            for start in range(0, len(ready), self.max_batch):
                part = ready[start : start + self.max_batch]
                self.engine._score([p[0] for p in part], [p[1] for p in part], [p[2] for p in part])
                for _, _, result, on_done in part:
                    on_done(result)


@contextmanager
def _failing(taken: list[tuple[LLMRequest, Callable[[LLMResult], None]]]) -> Iterator[None]:
    """Answers every request in ``taken`` with the error a failed step raises (those answered
    already are skipped: callbacks are once-only) and lets it propagate; the requests already
    rows are answered by the scheduler loop. A request taken from the queues and dropped would
    wait for ever and hold its place in the admission count."""
    try:
        yield
    except Exception as exc:
        for request, on_done in taken:
            on_done(LLMResult(adapter=request.adapter, finish_reason="error", error=_failure(exc)))
        raise


def _failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _once(on_done: Callable[[LLMResult], None]) -> Callable[[LLMResult], None]:
    answered = False

    def answer(result: LLMResult) -> None:
        nonlocal answered
        if not answered:  # one thread answers: the scheduler's
            answered = True
            on_done(result)

    return answer


def _cancelled(request: LLMRequest) -> bool:
    return bool(request.is_cancelled and request.is_cancelled())


def _cancelled_result(request: LLMRequest) -> LLMResult:
    return LLMResult(
        adapter=request.adapter, finish_reason="cancelled", error="cancelled by the caller"
    )


def _pick(logits: torch.Tensor, temps: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Next token per row: greedy where temperature is 0, else nucleus sampling."""
    chosen = logits.argmax(dim=-1)
    sampled = (temps > 0).nonzero().squeeze(1)
    if sampled.numel():
        probs = torch.softmax(logits[sampled] / temps[sampled, None], dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_ps[sampled, None]
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        pick = torch.multinomial(sorted_probs, 1)
        chosen[sampled] = order.gather(1, pick).squeeze(1)
    return chosen


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _generation_eos(model_dir: Path) -> Any:
    """The model's end-of-sequence id(s), as its generation config names them."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:  # no generation_config.json: the model config's
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_dir).eos_token_id
