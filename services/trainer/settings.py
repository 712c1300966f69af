from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import REPO_ROOT, CommonSettings


class TrainerSettings(CommonSettings):
    """Trainer settings: the data a job assembles, the training run, the gate and the rollout
    policy. Defaults train SmolLM2-135M with LoRA r16 on q/k/v/o for one epoch, gate on "not
    worse than live on the eval split and at most 2 % higher perplexity on general English than
    the base model", and promote after 50 shadow pairs."""

    model_config = SettingsConfigDict(env_prefix="KS_", extra="ignore", frozen=True)

    trainer_metrics_port: int = 0
    trainer_group: str = "ks-trainer"
    # Jobs (config, dataset, checkpoints, the trained adapter) and datasets kept for replay.
    trainer_dir: Path = REPO_ROOT / ".run" / "trainer"

    # --- data ------------------------------------------------------------------------------
    # Labelled questions every job trains on (PubMedQA format); empty = none.
    trainer_labelled_data: str = str(REPO_ROOT.parent / "shared/data/pubmedqa/labeled.json")
    # Share of labelled questions held out (by id, deterministically) to evaluate adapters on.
    trainer_eval_share: float = Field(0.2, ge=0.0, lt=1.0)
    # Replayed examples of the parent adapter's training data, as a share of the new examples.
    trainer_replay_share: float = Field(0.3, ge=0.0, le=2.0)
    # Passages retrieved per domain question of a retrain request (continued-pretraining text),
    # and the most such passages per job.
    trainer_domain_k: int = Field(3, ge=0, le=20)
    trainer_max_documents: int = Field(200, ge=0)
    # Documents ingested recently (chunks on the chunk topic since the parent adapter was
    # registered, at most this many hours back) as continued-pretraining text: the newest
    # KS_TRAINER_MAX_RECENT_DOCUMENTS chunks not already in the labelled questions' prompts.
    trainer_recent_hours: float = Field(168.0, ge=0)
    trainer_max_recent_documents: int = Field(100, ge=0)
    # Context of training prompts, in characters (eval prompts use the infer service's budget,
    # as served): the best-ranked passages, fewer of them, so a run on 400 questions stays
    # within 15 minutes on 2 CPU cores.
    trainer_context_chars: int = Field(1500, ge=200)
    # Labelled items train on "label. long answer" (PubMedQA's LONG_ANSWER) when they have one.
    trainer_with_reasons: bool = True
    # Most feedback corrections per job (newest first).
    trainer_max_corrections: int = Field(500, ge=0)
    # Questions retrieved for at once while assembling.
    trainer_retrieve_concurrency: int = Field(8, ge=1)

    # --- training --------------------------------------------------------------------------
    trainer_backend: Literal["deepspeed", "torch"] = "deepspeed"
    trainer_epochs: float = Field(1.0, gt=0, le=20)
    trainer_micro_batch: int = Field(4, ge=1)
    trainer_grad_accum: int = Field(2, ge=1)
    trainer_learning_rate: float = Field(1e-3, gt=0)
    trainer_lora_r: int = Field(16, ge=1)
    trainer_max_tokens: int = Field(512, ge=32)
    trainer_checkpoint_every: int = Field(20, ge=1)
    # Elastic weight consolidation around the parent adapter (0 = off; replay is always on).
    trainer_ewc_lambda: float = Field(0.0, ge=0)
    # Torch threads of the training process (0 = torch's default).
    trainer_threads: int = Field(0, ge=0)
    trainer_seed: int = 0

    # --- gate ------------------------------------------------------------------------------
    # Least accuracy gain over the live adapter on the eval split (0 = not worse).
    trainer_gate_min_gain: float = Field(0.0, ge=-1.0, le=1.0)
    # Largest rise in perplexity on the general-English set over the base model, percent.
    trainer_gate_max_forgetting_pct: float = Field(2.0, ge=0.0)
    trainer_gate_min_eval_items: int = Field(20, ge=1)
    # Score-mode requests in flight while evaluating (so Triton batches them).
    trainer_gate_concurrency: int = Field(8, ge=1)
    # Tokens of general English (pydoc_data's topics, shipped with Python) for the perplexity.
    trainer_general_tokens: int = Field(4096, ge=256)

    # --- rollout policy --------------------------------------------------------------------
    trainer_policy: Literal["auto", "manual"] = "auto"
    # Shadow pairs to see before a decision, and the share of live traffic mirrored meanwhile.
    trainer_shadow_samples: int = Field(50, ge=1)
    trainer_shadow_share: float = Field(1.0, gt=0, le=1)
    # Retire the candidate when its shadow answers agree less than this with live (a broken
    # adapter), or when more than this share of its shadow calls failed.
    trainer_min_agreement: float = Field(0.3, ge=0, le=1)
    trainer_max_shadow_errors: float = Field(0.1, ge=0, le=1)
    # Retire the candidate when at least this many feedback votes on differing shadow pairs
    # are in and more of them favour live than the candidate.
    trainer_min_feedback_votes: int = Field(3, ge=1)
