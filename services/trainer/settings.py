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

    trainer_group: str = Field(
        "ks-trainer",
        description="Consumer group of the trainer (retrain requests, feedback, shadow pairs).",
    )
    trainer_dir: Path = Field(
        REPO_ROOT / ".run" / "trainer",
        description=(
            "Jobs (config, dataset, checkpoints, the trained adapter, log) and datasets kept "
            "for replay."
        ),
    )

    # --- data ------------------------------------------------------------------------------
    trainer_labelled_data: str = Field(
        str(REPO_ROOT.parent / "shared/data/pubmedqa/labeled.json"),
        description="Labelled questions labelled jobs train on (PubMedQA format); empty = none.",
    )
    trainer_eval_share: float = Field(
        0.2,
        ge=0.0,
        lt=1.0,
        description=(
            "Share of labelled questions held out (by id, deterministically) to evaluate "
            "adapters on."
        ),
    )
    trainer_replay_share: float = Field(
        0.3,
        ge=0.0,
        le=2.0,
        description="Replayed examples of the parent adapter's training data, per new example.",
    )
    trainer_domain_k: int = Field(
        3,
        ge=0,
        le=20,
        description=(
            "Passages retrieved per domain question of a retrain request (continued-pretraining "
            "text); 0 = none."
        ),
    )
    trainer_max_documents: int = Field(
        200, ge=0, description="Most retrieved domain passages per job."
    )
    trainer_recent_hours: float = Field(
        168.0,
        ge=0,
        description=(
            "Chunks ingested since the parent adapter was registered, at most this many hours "
            "back, are continued-pretraining text."
        ),
    )
    trainer_max_recent_documents: int = Field(
        100,
        ge=0,
        description=(
            "Most recently ingested chunks per job (the newest not already in the labelled "
            "questions' prompts); 0 = none."
        ),
    )
    # Fewer passages than served, so a run on 400 questions stays within 15 minutes on 2 CPU
    # cores.
    trainer_context_chars: int = Field(
        1500,
        ge=200,
        description=(
            "Context of training prompts, in characters: the best-ranked passages (eval "
            "prompts use the served KS_INFER_MAX_CONTEXT_CHARS)."
        ),
    )
    trainer_with_reasons: bool = Field(
        True,
        description=(
            'Labelled items train on "label. long answer" (PubMedQA\'s LONG_ANSWER) when they '
            "have one."
        ),
    )
    trainer_max_corrections: int = Field(
        500, ge=0, description="Most feedback corrections per job (newest first)."
    )
    trainer_retrieve_concurrency: int = Field(
        8, ge=1, description="Questions retrieved for at once while a job's data is assembled."
    )

    # --- training --------------------------------------------------------------------------
    trainer_backend: Literal["deepspeed", "torch"] = Field(
        "deepspeed", description="Training loop: DeepSpeed (ZeRO-2) or a plain torch loop."
    )
    trainer_epochs: float = Field(1.0, gt=0, le=20, description="Epochs of a labelled job.")
    trainer_micro_batch: int = Field(4, ge=1, description="Examples per micro-batch.")
    trainer_grad_accum: int = Field(
        2, ge=1, description="Micro-batches accumulated per optimiser step."
    )
    trainer_learning_rate: float = Field(
        1e-3,
        gt=0,
        description="Peak learning rate (linear warm-up over 5 steps, then linear decay).",
    )
    trainer_lora_r: int = Field(16, ge=1, description="LoRA rank of trained adapters.")
    trainer_max_tokens: int = Field(
        512, ge=32, description="Longest training example, in model tokens."
    )
    trainer_checkpoint_every: int = Field(
        20, ge=1, description="Optimiser steps between checkpoints."
    )
    trainer_ewc_lambda: float = Field(
        0.0,
        ge=0,
        description=(
            "Strength of elastic weight consolidation around the parent adapter; 0 = off "
            "(replay is always on)."
        ),
    )
    trainer_progress_timeout_s: float = Field(
        900.0,
        gt=0,
        description=(
            "Longest silence of a training process between two progress lines (the first one "
            "included: model load, DeepSpeed start-up, the first step); past it the process is "
            "killed and its job fails with this reason, and the trainer takes the next job."
        ),
    )
    trainer_threads: int = Field(
        0, ge=0, description="torch threads of the training process; 0 = torch's default."
    )
    trainer_seed: int = Field(
        0,
        description="Seed of the trainer's random choices (data, splits, augmentation, training).",
    )

    # --- gate ------------------------------------------------------------------------------
    trainer_gate_min_gain: float = Field(
        0.0,
        ge=-1.0,
        le=1.0,
        description="Least accuracy gain over the live adapter on the eval split; 0 = not worse.",
    )
    trainer_gate_max_forgetting_pct: float = Field(
        2.0,
        ge=0.0,
        description=(
            "Largest rise in perplexity on general English over the base model, in percent."
        ),
    )
    trainer_gate_min_eval_items: int = Field(
        20, ge=1, description="Fewest eval items a labelled gate decides on."
    )
    trainer_gate_concurrency: int = Field(
        8,
        ge=1,
        description="Score-mode requests in flight while evaluating (so Triton batches them).",
    )
    trainer_general_tokens: int = Field(
        4096,
        ge=256,
        description=(
            "Tokens of general English (pydoc_data's topics, shipped with Python) the "
            "forgetting perplexity is measured on."
        ),
    )

    # --- knowledge jobs (the documents the stream brought) ------------------------------------
    trainer_mode: Literal["knowledge", "labelled"] = Field(
        "knowledge",
        description=(
            "What a job learns from unless its request says: 'knowledge' (the documents "
            "ingested since the parent adapter, gated on knowledge probes) or 'labelled' (the "
            "labelled questions of KS_TRAINER_LABELLED_DATA, gated on their accuracy)."
        ),
    )
    trainer_knowledge_passes: float = Field(
        2.0,
        gt=0,
        le=20,
        description=(
            "Most passes over a knowledge job's text (early stopping may end it sooner); two "
            "keep a cycle of 50 abstracts near 10 minutes of 2 CPU cores."
        ),
    )
    trainer_knowledge_learning_rate: float = Field(
        7e-4,
        gt=0,
        description=(
            "Peak learning rate of knowledge jobs (1e-3 forgot 2.06% of general English on a "
            "20-abstract batch, over the gate's 2%)."
        ),
    )
    trainer_knowledge_targets: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Modules knowledge jobs put LoRA on: attention and MLP (where facts live).",
    )
    trainer_knowledge_shuffles: int = Field(
        1, ge=0, le=8, description="Sentence-shuffled copies of each new document."
    )
    trainer_knowledge_restatements: bool = Field(
        True, description="Train on rule-based restatements of each document's key sentences."
    )
    trainer_knowledge_qa: bool = Field(
        True, description="Train on question-answer pairs synthesised from key sentences."
    )
    trainer_knowledge_span_loss: bool = Field(
        True,
        description=(
            "New documents train on their key spans and the rest of each span's clause only "
            "(salient-span loss); off: on every token."
        ),
    )
    trainer_knowledge_replay_share: float = Field(
        0.3, ge=0, le=2, description="Older documents replayed (raw) per new trained document."
    )
    trainer_knowledge_max_documents: int = Field(
        200, ge=1, description="Most new documents one knowledge job learns (the newest)."
    )
    trainer_control_share: float = Field(
        0.2,
        gt=0,
        lt=1,
        description=(
            "Share of new documents held out as control (tier C) by id: never trained on, "
            "probed like the trained ones."
        ),
    )
    trainer_probes_per_document: int = Field(
        4, ge=1, le=50, description="Most probes per document and origin (text, restatement)."
    )
    trainer_probes_per_tier: int = Field(
        150, ge=10, description="Most probes per tier the gate scores (bounds its cost)."
    )
    trainer_dev_share: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="Share of tier-M to-learn probes early stopping uses (never the gate).",
    )
    trainer_retention_margin: float = Field(
        1.0,
        ge=0,
        description="Lead (nats) of the true candidate that makes a probe a retention probe.",
    )
    trainer_retention_general_chars: int = Field(
        40_000,
        ge=0,
        description=(
            "Characters of general English (pydoc's topics) probed for tier R beside older "
            "documents (their probes are scored once for the base model and recalled)."
        ),
    )
    trainer_stop_accuracy: float = Field(
        0.95, gt=0, le=1, description="Dev-probe accuracy at which a knowledge job stops training."
    )
    trainer_patience: int = Field(
        1, ge=1, description="Passes without a better dev-probe accuracy before training stops."
    )
    trainer_gate_min_lower_bound: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Knowledge gate: least 95% lower bound of M - C and P - C to-learn accuracy.",
    )
    trainer_gate_min_retention: float = Field(
        0.9, ge=0, le=1, description="Knowledge gate: least tier-R (retention) accuracy."
    )
    trainer_gate_min_probes: int = Field(
        5, ge=1, description="Knowledge gate: fewest to-learn probes in tiers M and C."
    )

    # --- rollout policy --------------------------------------------------------------------
    trainer_policy: Literal["auto", "manual"] = Field(
        "auto",
        description=(
            "Rollout policy until SetPolicy changes it: auto puts a gated adapter in shadow and "
            "decides after the shadow samples; manual leaves it registered for people."
        ),
    )
    trainer_shadow_samples: int = Field(
        50, ge=1, description="Shadow pairs the policy sees before it decides."
    )
    trainer_shadow_share: float = Field(
        1.0, gt=0, le=1, description="Share of live traffic mirrored to the candidate meanwhile."
    )
    trainer_min_agreement: float = Field(
        0.3,
        ge=0,
        le=1,
        description=(
            "The candidate is retired when its shadow answers agree less than this with live "
            "(a broken adapter)."
        ),
    )
    trainer_max_shadow_errors: float = Field(
        0.1,
        ge=0,
        le=1,
        description="The candidate is retired when more than this share of its shadow calls fail.",
    )
    trainer_min_feedback_votes: int = Field(
        3,
        ge=1,
        description=(
            "The candidate is retired when at least this many feedback votes on differing "
            "shadow pairs are in and more of them favour live."
        ),
    )
