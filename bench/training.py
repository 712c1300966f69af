"""Training benchmarks: the DeepSpeed path against a plain torch + peft loop on the same model and
data (alternating runs, medians), the wall time of one run on 400 PubMedQA items, and (section
"loop", against the running stack) the loop's adapter vs the base model on held-out items.

    .venv/bin/python -m bench.training --json [--sections speed,full,loop] [--items 48]

Each run is the trainer's own child process (services/trainer/train.py) on SmolLM2-135M-Instruct
(KS_LLM_MODEL), with the item's abstract as its context passage.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from services.common.models import resolve_llm_dir
from services.common.settings import REPO_ROOT, CommonSettings
from services.llm.prompts import Passage
from services.trainer.data import assemble, qa_example
from services.trainer.evaluation import Item, load_items
from services.trainer.train import TrainConfig, child_env

DATA = REPO_ROOT.parent / "shared" / "data" / "pubmedqa" / "labeled.json"


def passages(item: Item) -> list[Passage]:
    return [Passage(item.id, f"{item.id}#0", "", "\n".join(item.contexts))]


def run_job(job: Path, items: list[Item], config: TrainConfig) -> dict[str, Any]:
    job.mkdir(parents=True, exist_ok=True)
    dataset = assemble([qa_example(i, passages(i)) for i in items], eval_share=0.0)
    (job / "dataset.json").write_text(json.dumps(dataset.to_json()), encoding="utf-8")
    config.save(job / "config.json")
    env = child_env(CommonSettings().cache_dir)
    started = time.perf_counter()
    reply = subprocess.run(
        [sys.executable, "-m", "services.trainer.train", str(job)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    wall = time.perf_counter() - started
    if reply.returncode != 0:
        print(reply.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"training run failed ({config.backend})")
    done = json.loads(reply.stdout.strip().splitlines()[-1])
    done["wall_s"] = round(wall, 1)
    return done


def knowstream(*args: str) -> dict[str, Any]:
    """Runs the CLI as a user would; returns its last line (JSON)."""
    reply = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "--timeout", "3600", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if not reply.stdout.strip():
        raise SystemExit(f"knowstream {' '.join(args)} failed: {reply.stderr[-2000:]}")
    return dict(json.loads(reply.stdout.strip().splitlines()[-1]))


def loop(data: Path, tmp: Path) -> dict[str, Any]:
    """The loop's own path, through the running stack (`make up`): `knowstream train` on the
    labelled file (a new LoRA on the base model; the trainer holds out its eval split by id),
    then `knowstream eval pubmedqa` on the held-out items for the base model and the adapter,
    with retrieval."""
    from services.trainer.data import in_eval_split
    from services.trainer.settings import TrainerSettings

    ts = TrainerSettings()
    raw = json.loads(data.read_text(encoding="utf-8"))
    held = {
        k: v
        for k, v in raw.items()
        if in_eval_split(f"qa:{k}", ts.trainer_eval_share, ts.trainer_seed)
    }
    held_file = tmp / "heldout.json"
    held_file.write_text(json.dumps(held), encoding="utf-8")
    started = time.perf_counter()
    job = knowstream(
        "train",
        "--data",
        str(data),
        "--parent",
        "base",
        "--no-rollout",
        "--reason",
        "bench.training loop",
        "--json",
    )
    wall = time.perf_counter() - started
    out: dict[str, Any] = {
        "labelled_items": len(raw),
        "train_examples": job.get("train_examples"),
        "heldout_items": len(held),
        "job_state": job["state"],
        "job_wall_s": round(wall, 1),
        "timings": job.get("timings"),
        "steps": job.get("steps"),
        "tokens_per_s": job.get("tokens_per_s"),
        "final_loss": job.get("loss"),
        "gate": job.get("gate"),
        "adapter": job.get("adapter_id"),
    }
    base = knowstream("eval", "pubmedqa", "--data", str(held_file), "--adapter", "base", "--json")
    out["heldout_base"] = base
    if job["state"] == "registered":
        tuned = knowstream(
            "eval", "pubmedqa", "--data", str(held_file), "--adapter", job["adapter_id"], "--json"
        )
        out["heldout_adapter"] = tuned
        out["accuracy_gain_points"] = round(100 * (tuned["accuracy"] - base["accuracy"]), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.training")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--sections", default="speed,full")
    parser.add_argument("--items", type=int, default=48, help="items per speed run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per backend (alternating)")
    parser.add_argument("--full-items", type=int, default=400)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    settings = CommonSettings()
    model_dir = str(resolve_llm_dir(settings.llm_model, settings.cache_dir))
    items = load_items(json.loads(args.data.read_text(encoding="utf-8")))
    sections = set(args.sections.split(","))
    out: dict[str, Any] = {"model": settings.llm_model}

    def config(backend: str) -> TrainConfig:
        return TrainConfig(
            model_dir=model_dir,
            backend=backend,  # type: ignore[arg-type]
            epochs=1,
            micro_batch=4,
            grad_accum=2,
            max_tokens=512,
            checkpoint_every=10**6,
        )

    with tempfile.TemporaryDirectory() as tmp:
        if "speed" in sections:
            rates: dict[str, list[float]] = {"deepspeed": [], "torch": []}
            for r in range(args.repeats):
                for backend in ("deepspeed", "torch"):
                    done = run_job(
                        Path(tmp) / f"{backend}-{r}", items[: args.items], config(backend)
                    )
                    rates[backend].append(done["tokens_per_s"])
                    print(f"{backend} run {r}: {done['tokens_per_s']} tokens/s", file=sys.stderr)
            ds, plain = statistics.median(rates["deepspeed"]), statistics.median(rates["torch"])
            out["speed"] = {
                "items": args.items,
                "runs": rates,
                "deepspeed_tokens_per_s": ds,
                "torch_tokens_per_s": plain,
                "ratio_deepspeed_to_torch": round(ds / plain, 3),
            }
        if "full" in sections:
            done = run_job(Path(tmp) / "full", items[: args.full_items], config("deepspeed"))
            out["full"] = {
                "items": args.full_items,
                "wall_s": done["wall_s"],
                "train_seconds": done["seconds"],
                "steps": done["steps"],
                "train_tokens": done["train_tokens"],
                "tokens_per_s": done["tokens_per_s"],
                "final_loss": done["final_loss"],
                "bf16": done["bf16"],
            }
        if "loop" in sections:
            out["loop"] = loop(args.data, Path(tmp))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
