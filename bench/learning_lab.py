"""The acquisition recipe in process, without the stack: what each part of knowledge
augmentation adds, at the same training budget.

    .venv/bin/python -m bench.learning_lab --json [--documents 20] [--tokens 20000] [--seed 0]

One batch of PubMedQA abstracts (the first N of the file; the next N play the older documents a
parent trained on, for replay and retention) is probed as the trainer probes it (same tiers,
to-learn against the base model), then one adapter per variant is trained by the trainer's own
child process (services/trainer/train.py) for the same number of training tokens, and scored on
the same probes in process (the engine's arithmetic: services/common/scoring.py). Variants:
raw text only, + sentence shuffles, + restatements, + QA pairs, + replay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_DATA, load_pubmedqa
from services.common.knowledge import ProbeSet, build_probe_set, probe_pools, split_control
from services.common.models import resolve_llm_dir
from services.common.probes import Document, Probe, pubmedqa_document
from services.common.settings import CommonSettings
from services.trainer.augment import Augmentation
from services.trainer.data import Dataset, assemble
from services.trainer.knowledge_data import KnowledgeRecipe, training_examples
from services.trainer.train import TrainConfig, child_env

# LoRA on attention and MLP: facts are stored in the MLPs as much as anywhere.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS: dict[str, tuple[Augmentation, float, bool]] = {
    # (augmentation, replay share, salient-span loss)
    "raw": (Augmentation(shuffles=0, restatements=False, qa_pairs=False), 0.0, True),
    "+shuffles": (Augmentation(shuffles=1, restatements=False, qa_pairs=False), 0.0, True),
    "+restatements": (Augmentation(shuffles=1, restatements=True, qa_pairs=False), 0.0, True),
    "+qa": (Augmentation(shuffles=1, restatements=True, qa_pairs=True), 0.0, True),
    "+replay": (Augmentation(shuffles=1, restatements=True, qa_pairs=True), 0.3, True),
    # The same as +replay with the loss on every token instead of the key spans.
    "full-loss": (Augmentation(shuffles=1, restatements=True, qa_pairs=True), 0.3, False),
}


class Scorer:
    """Probes scored in process, once per (model, probe), batched."""

    def __init__(self, model_dir: Path, threads: int = 2):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model_dir = model_dir
        self.base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def score(self, probes: list[Probe], adapter_dir: str = "") -> list[list[float]]:
        from services.trainer.probe_score import probe_logprobs

        if not adapter_dir:
            return probe_logprobs(self.base, self.tokenizer, probes)
        from peft import PeftModel

        model = PeftModel.from_pretrained(self.base, adapter_dir).eval()
        try:
            return probe_logprobs(model, self.tokenizer, probes)
        finally:
            self.base = model.unload()


def probe_set(
    scorer: Scorer, docs: list[Document], older: list[Document], recipe: KnowledgeRecipe
) -> tuple[ProbeSet, list[Document]]:
    """The trainer's tiers for this batch (knowledge_data.build_knowledge_data's), with the base
    model's scores computed in one batch up front."""
    trained, _ = split_control(docs, recipe.control_share)
    learn, retention = probe_pools(
        docs,
        {d.id for d in trained},
        older,
        recipe.general_chars,
        recipe.seed,
        recipe.probes_per_document,
    )
    pool = [p for ps in learn.values() for p in ps] + retention
    known = {
        (p.prefix, tuple(p.candidates)): lp for p, lp in zip(pool, scorer.score(pool), strict=True)
    }

    async def score(prompt: str, candidates: list[str], adapter: str) -> list[float]:
        return known[(prompt, tuple(candidates))]

    limits = replace(recipe.limits, dev_share=0.0)  # the lab trains fixed budgets
    return asyncio.run(build_probe_set(learn, retention, "base", score, limits)), trained


def train(job: Path, config: TrainConfig, dataset: Any) -> dict[str, Any]:
    job.mkdir(parents=True, exist_ok=True)
    (job / "dataset.json").write_text(json.dumps(dataset.to_json()), encoding="utf-8")
    config.save(job / "config.json")
    started = time.perf_counter()
    reply = subprocess.run(
        [sys.executable, "-m", "services.trainer.train", str(job)],
        capture_output=True,
        text=True,
        env=child_env(CommonSettings().cache_dir),
        check=False,
    )
    if reply.returncode != 0:
        print(reply.stderr[-3000:], file=sys.stderr)
        raise SystemExit("training run failed")
    done = json.loads(reply.stdout.strip().splitlines()[-1])
    done["wall_s"] = round(time.perf_counter() - started, 1)
    return dict(done)


def tokens_of(dataset: Any, tokenizer: Any, max_tokens: int) -> int:
    return sum(
        min(max_tokens, len(tokenizer(e.target, add_special_tokens=True)["input_ids"]))
        for e in dataset.train
    )


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--documents", type=int, default=20, help="abstracts in the batch")
    ap.add_argument("--tokens", type=int, default=20_000, help="training tokens per variant")
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    return ap.parse_args()


def variant_dataset(
    name: str, recipe: KnowledgeRecipe, trained: list[Document], older: list[Document], seed: int
) -> Dataset:
    """The training data of one variant: the batch's documents augmented as it says, with its
    share of replayed older documents."""
    augmentation, replay_share, span_loss = VARIANTS[name]
    variant = replace(
        recipe,
        augmentation=replace(augmentation, seed=seed),
        replay_share=replay_share,
        span_loss=span_loss,
    )
    new, replay = training_examples(trained, older, variant)
    return assemble(new, replay, eval_share=0.0, seed=seed)


def train_config(
    model_dir: Path, epochs: float, micro_batch: int, learning_rate: float, seed: int
) -> TrainConfig:
    return TrainConfig(
        model_dir=str(model_dir),
        backend="deepspeed",
        lora_dropout=0.0,
        target_modules=list(TARGETS),
        epochs=epochs,
        micro_batch=micro_batch,
        grad_accum=1,
        learning_rate=learning_rate,
        seed=seed,
        general_tokens=2048,
    )


def score_variant(
    scorer: Scorer,
    probes: ProbeSet,
    name: str,
    per_pass: int,
    config: TrainConfig,
    summary: dict[str, Any],
) -> dict[str, Any]:
    """The variant's row: its adapter's accuracy per tier on the probes, and its training
    figures."""
    t = time.perf_counter()
    row: dict[str, Any] = {"variant": name, "tokens_per_pass": per_pass}
    row["passes"] = round(config.epochs, 2)
    for tier, ps in probes.tiers.items():
        lps = scorer.score(ps, summary["adapter_dir"])
        right = sum(1 for lp in lps if max(range(len(lp)), key=lp.__getitem__) == 0)
        row[tier] = round(right / len(ps), 4) if ps else None
    row["n"] = probes.sizes
    row["train_s"] = summary["seconds"]
    row["tokens_per_s"] = summary["tokens_per_s"]
    row["perplexity_pct"] = round(100 * (summary["perplexity"] / summary["base_perplexity"] - 1), 2)
    row["score_s"] = round(time.perf_counter() - t, 1)
    return row


def main() -> None:
    args = parse_args()
    data = load_pubmedqa(args.data)
    items = [pubmedqa_document(k, v) for k, v in data.items()]
    docs, older = items[: args.documents], items[args.documents : 2 * args.documents]
    settings = CommonSettings()
    model_dir = resolve_llm_dir(settings.llm_model, settings.cache_dir)
    scorer = Scorer(model_dir)
    recipe = KnowledgeRecipe(seed=args.seed)
    t = time.perf_counter()
    probes, trained = probe_set(scorer, docs, older, recipe)
    setup_s = round(time.perf_counter() - t, 1)
    print(json.dumps({"probes": probes.sizes, "setup_s": setup_s}), file=sys.stderr, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            dataset = variant_dataset(name, recipe, trained, older, args.seed)
            per_pass = tokens_of(dataset, scorer.tokenizer, 512)
            config = train_config(
                model_dir,
                max(1.0, args.tokens / per_pass),
                args.micro_batch,
                args.learning_rate,
                args.seed,
            )
            summary = train(Path(tmp) / name, config, dataset)
            row = score_variant(scorer, probes, name, per_pass, config, summary)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    result = {
        "documents": args.documents,
        "budget_tokens": args.tokens,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "setup_s": setup_s,
        "ablation": rows,
    }
    if not args.json:
        for r in rows:
            print(
                f"{r['variant']:>15}  M {r['M']}  P {r['P']}  C {r['C']}  R {r['R']}  "
                f"({r['passes']} passes, {r['train_s']}s)"
            )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
