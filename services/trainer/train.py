"""One LoRA training run, meant to run in a child process of the trainer service:

    python -m services.trainer.train JOB_DIR

``JOB_DIR/config.json`` holds a :class:`TrainConfig`; the dataset is ``JOB_DIR/dataset.json``.
Progress goes to stdout as JSON lines (``{"event": "progress", "step", "steps", "loss",
"tokens_per_s", "eta_s"}``, then ``{"event": "done", ...}``), which the service turns into
Kafka events. Checkpoints go to ``JOB_DIR/checkpoints``; a run started again on the same job
directory resumes from the last one (same data order, the remaining steps only). The adapter is
written to ``JOB_DIR/adapter`` (peft format: adapter_config.json + adapter_model.safetensors).

Two backends with the same data, model and loop: ``deepspeed`` (ZeRO stage 2, gradient
accumulation, bf16 where the CPU/GPU has it; ``DS_ACCELERATOR=cpu`` here, the deepspeed launcher
with several GPUs in production) and ``torch`` (a plain torch + peft loop, the benchmark's
baseline).

Over 400 lines because both backends and the resume, EWC and progress protocol they share run
in one child process, started as one module.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Emit = Callable[[dict[str, Any]], None]
# Environment variable naming the parent's pid: the process dies with it (see die_with_parent).
DIE_WITH_PARENT = "KS_TRAIN_DIE_WITH_PARENT"


@dataclass
class TrainConfig:
    model_dir: str
    backend: Literal["deepspeed", "torch"] = "deepspeed"
    # An adapter directory to start from (the parent); empty = a new LoRA.
    parent_adapter: str = ""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    epochs: float = 1.0
    micro_batch: int = 4
    grad_accum: int = 2
    learning_rate: float = 2e-4
    warmup_steps: int = 5
    max_tokens: int = 512
    zero_stage: int = 2
    # None = bf16 where the hardware has native support.
    bf16: bool | None = None
    checkpoint_every: int = 20
    # EWC: penalty λ·Σ F·(θ - θ_parent)² on the LoRA weights, F from squared gradients on the
    # replayed examples (needs a parent adapter; 0 = off).
    ewc_lambda: float = 0.0
    seed: int = 0
    threads: int = 0
    # Tokens of general English to measure forgetting on after training (0 = skip).
    general_tokens: int = 0
    # Early stopping on knowledge probes (a JSON list of services.common.probes.Probe that the
    # gate never uses): after each pass over the data the probes are scored; training stops
    # once their accuracy reaches stop_accuracy or has not improved for `patience` passes, and
    # the adapter of the best pass is kept. Empty = train every pass.
    dev_probes: str = ""
    stop_accuracy: float = 0.95
    patience: int = 1

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return cls(**json.loads(path.read_text(encoding="utf-8")))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")


def child_env(cache_dir: Path) -> dict[str, str]:
    """Environment of a training process: DeepSpeed on CPU unless a GPU is there, and its
    compiled ops cached with the project's other derived artefacts."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(cache_dir / "torch_extensions")}
    env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def _stdout_emit(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


def native_bf16() -> bool:
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    from services.common.embedding import cpu_has_bf16

    return cpu_has_bf16()


def batches(
    encoded: list[tuple[list[int], list[int]]],
    micro_batch: int,
    pad_id: int,
    seed: int,
    epochs: float,
) -> Iterator[tuple[Any, Any, Any, int]]:
    """Micro-batches in a fixed order, right-padded; yields (input_ids, attention_mask, labels,
    real tokens). Per epoch: a seeded shuffle, then examples of similar length grouped into the
    same micro-batch (within windows of 16 micro-batches, whose order is shuffled again), which
    cuts the padding the model computes on without making the order depend on length alone."""
    import torch

    total = max(1, math.ceil(len(encoded) * epochs / micro_batch))
    groups: list[list[int]] = []
    epoch = 0
    while len(groups) * micro_batch < total * micro_batch:
        rng = random.Random(seed * 1000 + epoch)
        idx = list(range(len(encoded)))
        rng.shuffle(idx)
        window = micro_batch * 16
        epoch_groups = []
        for w in range(0, len(idx), window):
            part = sorted(idx[w : w + window], key=lambda i: -len(encoded[i][0]))
            epoch_groups += [part[g : g + micro_batch] for g in range(0, len(part), micro_batch)]
        rng.shuffle(epoch_groups)
        groups += epoch_groups
        epoch += 1
    for b in range(total):
        rows = [encoded[i] for i in groups[b]]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, lab) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, : len(lab)] = torch.tensor(lab)
            mask[r, : len(ids)] = 1
        yield input_ids, mask, labels, int(mask.sum())


def micro_batch_count(examples: int, micro_batch: int, epochs: float) -> int:
    return max(1, math.ceil(examples * epochs / micro_batch))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_model(config: TrainConfig) -> tuple[Any, Any]:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(config.seed)
    base = AutoModelForCausalLM.from_pretrained(config.model_dir, dtype=torch.float32)
    if config.parent_adapter:
        model = PeftModel.from_pretrained(base, config.parent_adapter, is_trainable=True)
    else:
        model = get_peft_model(
            base,
            LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=config.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    return model, tokenizer


def run(job_dir: Path, emit: Emit = _stdout_emit) -> dict[str, Any]:
    """Trains (or resumes) the job in ``job_dir``; returns the final summary."""
    import torch

    from services.trainer.data import Dataset, tokenize

    config = TrainConfig.load(job_dir / "config.json")
    if config.threads:
        torch.set_num_threads(config.threads)
    dataset = Dataset.from_json(json.loads((job_dir / "dataset.json").read_text(encoding="utf-8")))
    model, tokenizer = build_model(config)
    encoded = [tokenize(e, tokenizer, config.max_tokens) for e in dataset.train]
    if not encoded:
        raise ValueError("the dataset has no training examples")
    micro_batches = micro_batch_count(len(encoded), config.micro_batch, config.epochs)
    steps = max(1, micro_batches // config.grad_accum)
    bf16 = native_bf16() if config.bf16 is None else config.bf16
    trainable = [p for p in model.parameters() if p.requires_grad]
    ewc = _ewc_terms(model, tokenizer, dataset, config) if config.ewc_lambda else None
    ckpt_dir = job_dir / "checkpoints"
    trainer: _Backend = (
        _DeepSpeed(model, trainable, config, steps, bf16, ckpt_dir)
        if config.backend == "deepspeed"
        else _Torch(model, trainable, config, steps, bf16, ckpt_dir)
    )
    loop = _Loop(config, model, tokenizer, trainer, steps, bf16, emit)
    loop.ewc = ewc
    loop.run(encoded)
    adapter_dir = job_dir / "adapter"
    model.save_pretrained(str(adapter_dir))
    general: dict[str, Any] = {}
    if config.general_tokens:
        t = time.perf_counter()
        base_ppl, ppl = general_perplexity(model, tokenizer, config.general_tokens, bf16)
        general = {
            "base_perplexity": round(base_ppl, 4),
            "perplexity": round(ppl, 4),
            "general_tokens": config.general_tokens,
            "general_seconds": round(time.perf_counter() - t, 2),
        }
    losses, elapsed, tokens = loop.losses, loop.elapsed, loop.tokens
    summary = {
        "event": "done",
        "adapter_dir": str(adapter_dir),
        "steps": steps,
        "examples": len(encoded),
        "train_tokens": tokens,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed else 0.0,
        "final_loss": round(sum(losses[-5:]) / max(1, len(losses[-5:])), 5) if losses else None,
        "backend": config.backend,
        "bf16": bf16,
        **(loop.stopper.summary() if loop.stopper is not None else {}),
        **general,
    }
    emit(summary)
    return summary


class _Loop:
    """The optimisation loop of :func:`run`: micro-batches from the checkpoint it resumes on,
    a progress event per optimizer step, checkpoints, and the early stop on dev probes."""

    def __init__(
        self,
        config: TrainConfig,
        model: Any,
        tokenizer: Any,
        trainer: _Backend,
        steps: int,
        bf16: bool,
        emit: Emit,
    ):
        self.config, self.model, self.tokenizer, self.trainer = config, model, tokenizer, trainer
        self.steps, self.bf16, self.emit = steps, bf16, emit
        self.ewc: Callable[[Any], Any] | None = None
        self.tokens = 0
        self.losses: list[float] = []
        self.elapsed = 0.0
        self.stopper: _EarlyStop | None = None

    def run(self, encoded: list[Any]) -> None:
        import torch

        config, steps = self.config, self.steps
        done_micro = self.trainer.resume()
        if done_micro:
            emit_step = done_micro // config.grad_accum
            self.emit({"event": "resumed", "step": emit_step, "steps": steps})
        started = time.perf_counter()
        self.stopper = _EarlyStop.load(config, self.model, self.tokenizer, self.emit)
        per_pass = micro_batch_count(len(encoded), config.micro_batch, 1.0)
        self.model.train()
        pad = self.tokenizer.pad_token_id
        for i, (input_ids, mask, labels, real) in enumerate(
            batches(encoded, config.micro_batch, pad, config.seed, config.epochs)
        ):
            if i < done_micro:
                continue  # done before the checkpoint this run resumed from
            if i >= steps * config.grad_accum:
                break
            with torch.autocast(
                "cpu", dtype=torch.bfloat16, enabled=self.bf16 and not torch.cuda.is_available()
            ):
                out = self.trainer.forward(input_ids=input_ids, attention_mask=mask, labels=labels)
            loss = out.loss if self.ewc is None else out.loss + self.ewc(self.model)
            self.trainer.backward_step(loss)
            self.tokens += real
            self.losses.append(float(loss.detach()))
            if (i + 1) % config.grad_accum == 0:
                self._stepped((i + 1) // config.grad_accum, started, done_micro, i + 1)
            last = i + 1 == steps * config.grad_accum
            if (
                self.stopper is not None
                and ((i + 1) % per_pass == 0 or last)
                and self.stopper.after_pass(math.ceil((i + 1) / per_pass))
            ):
                break
        if self.stopper is not None:
            self.stopper.keep_best()
        self.elapsed = time.perf_counter() - started

    def _stepped(self, step: int, started: float, done_micro: int, micro: int) -> None:
        config = self.config
        elapsed = time.perf_counter() - started
        rate = self.tokens / elapsed if elapsed else 0.0
        remaining = (self.steps - step) * elapsed / max(1, step - done_micro // config.grad_accum)
        self.emit(
            {
                "event": "progress",
                "step": step,
                "steps": self.steps,
                "loss": round(sum(self.losses[-config.grad_accum :]) / config.grad_accum, 5),
                "tokens_per_s": round(rate, 1),
                "eta_s": round(remaining, 1),
            }
        )
        if step % config.checkpoint_every == 0 and step < self.steps:
            self.trainer.save(micro)


class _EarlyStop:
    """Scores the dev probes after each pass, remembers the best pass's LoRA weights and says
    when to stop (see TrainConfig.dev_probes)."""

    def __init__(
        self, config: TrainConfig, model: Any, tokenizer: Any, probes: list[Any], emit: Emit
    ):
        self.config, self.model, self.tokenizer, self.probes, self.emit = (
            config,
            model,
            tokenizer,
            probes,
            emit,
        )
        self.best = -1.0
        self.best_pass = 0
        self.best_state: dict[str, Any] = {}
        self.curve: list[float] = []

    @classmethod
    def load(cls, config: TrainConfig, model: Any, tokenizer: Any, emit: Emit) -> _EarlyStop | None:
        if not config.dev_probes or not Path(config.dev_probes).exists():
            return None
        from services.common.probes import Probe

        raw = json.loads(Path(config.dev_probes).read_text(encoding="utf-8"))
        probes = [Probe.from_json(p) for p in raw]
        return cls(config, model, tokenizer, probes, emit) if probes else None

    def after_pass(self, number: int) -> bool:
        from services.trainer.probe_score import accuracy, probe_logprobs

        t = time.perf_counter()
        acc = accuracy(probe_logprobs(self.model, self.tokenizer, self.probes))
        self.curve.append(round(acc, 4))
        self.emit(
            {
                "event": "dev",
                "pass": number,
                "accuracy": round(acc, 4),
                "probes": len(self.probes),
                "seconds": round(time.perf_counter() - t, 2),
            }
        )
        if acc > self.best:
            self.best, self.best_pass = acc, number
            self.best_state = {
                n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad
            }
        return acc >= self.config.stop_accuracy or number - self.best_pass >= self.config.patience

    def keep_best(self) -> None:
        if self.best_state and self.curve and self.curve[-1] < self.best:
            params = dict(self.model.named_parameters())
            for name, value in self.best_state.items():
                params[name].data.copy_(value)

    def summary(self) -> dict[str, Any]:
        return {
            "dev_accuracy": self.curve,
            "best_pass": self.best_pass,
            "dev_probes": len(self.probes),
        }


def general_text() -> str:
    """General English that ships with Python itself (pydoc's help topics: prose about the
    language, the same on every machine with this Python), in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def general_perplexity(model: Any, tokenizer: Any, tokens: int, bf16: bool) -> tuple[float, float]:
    """Perplexity of the base model (adapter disabled) and of the model with its adapter on the
    first ``tokens`` tokens of :func:`general_text`, in blocks of 256."""
    import torch

    ids = tokenizer(general_text(), add_special_tokens=False)["input_ids"][:tokens]
    block = 256
    rows = [ids[i : i + block] for i in range(0, len(ids) - block + 1, block)]
    batch = torch.tensor(rows, device=next(model.parameters()).device)
    cpu = batch.device.type == "cpu"
    model.eval()

    def nll() -> float:
        total = 0.0
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and cpu):
            for i in range(0, len(rows), 4):
                chunk = batch[i : i + 4]
                total += float(model(input_ids=chunk, labels=chunk).loss) * len(chunk)
        return total / len(rows)

    with model.disable_adapter():
        base = nll()
    return math.exp(base), math.exp(nll())


class _Backend:
    def forward(self, **inputs: Any) -> Any:
        raise NotImplementedError

    def resume(self) -> int:
        raise NotImplementedError

    def backward_step(self, loss: Any) -> None:
        raise NotImplementedError

    def save(self, micro_batches_done: int) -> None:
        raise NotImplementedError


class _DeepSpeed(_Backend):
    def __init__(
        self, model: Any, params: list[Any], config: TrainConfig, steps: int, bf16: bool, ckpt: Path
    ):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        import torch

        # A single-process "world" unless the deepspeed launcher set one up.
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
        scheduler = _schedule(optimizer, config.warmup_steps, steps)
        ds_config = {
            "train_micro_batch_size_per_gpu": config.micro_batch,
            "gradient_accumulation_steps": config.grad_accum,
            "zero_optimization": {"stage": config.zero_stage},
            "bf16": {"enabled": bool(bf16 and torch.cuda.is_available())},
            "gradient_clipping": 1.0,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.ckpt = ckpt
        self.grad_accum = config.grad_accum

    def forward(self, **inputs: Any) -> Any:
        return self.engine(**inputs)

    def resume(self) -> int:
        if not (self.ckpt / "latest").exists():
            return 0
        # Checkpoints hold the trainable (LoRA) weights only: the frozen base is not saved.
        _, client = self.engine.load_checkpoint(str(self.ckpt), load_module_strict=False)
        return int((client or {}).get("micro_batches_done", 0))

    def backward_step(self, loss: Any) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def save(self, micro_batches_done: int) -> None:
        # Without exclude_frozen_parameters every checkpoint would hold the whole base model
        # (540 MB for SmolLM2-135M); only the latest is kept.
        self.engine.save_checkpoint(
            str(self.ckpt),
            client_state={"micro_batches_done": micro_batches_done},
            exclude_frozen_parameters=True,
        )
        latest = (self.ckpt / "latest").read_text(encoding="utf-8").strip()
        for old in self.ckpt.glob("global_step*"):
            if old.name != latest:
                shutil.rmtree(old, ignore_errors=True)


class _Torch(_Backend):
    def __init__(
        self, model: Any, params: list[Any], config: TrainConfig, steps: int, bf16: bool, ckpt: Path
    ):
        import torch

        self.model = model
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
        self.scheduler = _schedule(self.optimizer, config.warmup_steps, steps)
        self.grad_accum = config.grad_accum
        self.micro = 0
        self.ckpt = ckpt / "torch.pt"

    def forward(self, **inputs: Any) -> Any:
        return self.model(**inputs)

    def resume(self) -> int:
        import torch

        if not self.ckpt.exists():
            return 0
        state = torch.load(self.ckpt, weights_only=False)
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        for name, value in state["params"].items():
            trainable[name].data.copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro = int(state["micro_batches_done"])
        return self.micro

    def backward_step(self, loss: Any) -> None:
        import torch

        (loss / self.grad_accum).backward()
        self.micro += 1
        if self.micro % self.grad_accum == 0:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    def save(self, micro_batches_done: int) -> None:
        import torch

        self.ckpt.parent.mkdir(parents=True, exist_ok=True)
        trainable = {
            n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad
        }
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save(
            {
                "params": trainable,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "micro_batches_done": micro_batches_done,
            },
            tmp,
        )
        tmp.replace(self.ckpt)  # a kill mid-save leaves the previous checkpoint whole


def _schedule(optimizer: Any, warmup_steps: int, steps: int) -> Any:
    """Linear warm-up, then linear decay to zero at the last step."""
    import torch

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / max(1, warmup_steps)) * max(0.0, 1.0 - step / max(1, steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _ewc_terms(
    model: Any, tokenizer: Any, dataset: Any, config: TrainConfig
) -> Callable[[Any], Any] | None:
    """Elastic weight consolidation around the parent adapter's weights, with the diagonal
    Fisher information estimated on replayed examples (those that are not new data)."""
    import torch

    from services.trainer.data import tokenize

    if not config.parent_adapter:
        return None
    anchors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in anchors.items()}
    replayed = [e for e in dataset.train if e.id in set(dataset.provenance.get("replay_ids", []))]
    sample = (replayed or dataset.train)[:32]
    params = dict(model.named_parameters())
    for example in sample:
        ids, labels = tokenize(example, tokenizer, config.max_tokens)
        model.zero_grad()
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        out.loss.backward()
        for n in fisher:
            grad = params[n].grad
            if grad is not None:
                fisher[n] += grad.detach() ** 2 / len(sample)
    model.zero_grad()

    def penalty(m: Any) -> Any:
        total = 0.0
        named = dict(m.named_parameters())
        for n, f in fisher.items():
            total = total + (f * (named[n] - anchors[n]) ** 2).sum()
        return config.ewc_lambda * total

    return penalty


def die_with_parent(parent_pid: int) -> None:
    """Linux kills this process when its parent (the trainer service) dies, so a killed trainer
    never leaves a training process behind; the restarted trainer resumes the job from its last
    checkpoint. Set here rather than in a pre-exec hook, which is unsafe in a threaded parent."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the hook was in place
        sys.exit(1)


def main() -> int:
    if os.environ.get(DIE_WITH_PARENT):
        die_with_parent(int(os.environ[DIE_WITH_PARENT]))
    if len(sys.argv) != 2:
        print("usage: python -m services.trainer.train JOB_DIR", file=sys.stderr)
        return 2
    run(Path(sys.argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
