"""LoRA training on the tiny model: DeepSpeed (ZeRO-2 on CPU) and the plain torch loop learn the
same thing from the same data; a run killed after a checkpoint resumes where it stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common.settings import CommonSettings
from services.llm.prompts import Passage
from services.trainer.data import Example, assemble, qa_example
from services.trainer.evaluation import load_items
from services.trainer.train import TrainConfig, child_env


def examples(pubmedqa: dict, part: slice) -> list[Example]:
    return [
        qa_example(i, [Passage(i.id, f"{i.id}#0", "", " ".join(i.contexts)[:300])])
        for i in load_items(pubmedqa)[part]
    ]


def make_job(
    root: Path, tiny_model: Path, pubmedqa: dict, backend: str, part=slice(0, 40), replay=(), **kw
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    dataset = assemble(examples(pubmedqa, part), replay, eval_share=0.0)
    dataset.provenance["replay_ids"] = [e.id for e in replay]
    (root / "dataset.json").write_text(json.dumps(dataset.to_json()), encoding="utf-8")
    options = dict(
        model_dir=str(tiny_model),
        backend=backend,
        epochs=2,
        micro_batch=4,
        grad_accum=2,
        learning_rate=5e-3,
        checkpoint_every=2,
        max_tokens=256,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        threads=1,
    )
    options.update(kw)
    TrainConfig(**options).save(root / "config.json")
    return root


def start(job: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "services.trainer.train", str(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=child_env(CommonSettings().cache_dir),
    )


def events(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith('{"event"')]


@pytest.mark.timeout(900)
def test_deepspeed_and_torch_train_the_same_and_a_killed_run_resumes(
    tiny_model, pubmedqa, tmp_path
):
    runs = {}
    for backend in ("deepspeed", "torch"):
        job = make_job(tmp_path / backend, tiny_model, pubmedqa, backend)
        proc = start(job)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-2000:]
        runs[backend] = events(out)
    for backend, evs in runs.items():
        progress = [e for e in evs if e["event"] == "progress"]
        done = evs[-1]
        # 40 examples x 2 epochs / (micro-batch 4 x accumulation 2)
        assert done["event"] == "done" and done["steps"] == 10 == len(progress), backend
        assert progress[-1]["loss"] < progress[0]["loss"], backend
        adapter = Path(done["adapter_dir"])
        assert (adapter / "adapter_config.json").exists()
        assert (adapter / "adapter_model.safetensors").exists()
        assert progress[-1]["eta_s"] == 0 and progress[0]["tokens_per_s"] > 0
    # Same data order, same model, same optimiser: the same losses, step by step.
    ds = [e["loss"] for e in runs["deepspeed"] if e["event"] == "progress"]
    plain = [e["loss"] for e in runs["torch"] if e["event"] == "progress"]
    assert ds == pytest.approx(plain, rel=1e-3)

    # Killed (SIGKILL) after its first checkpoint, run again on the same job: it resumes there
    # and finishes with the same losses as the run that was never interrupted.
    job = make_job(tmp_path / "killed", tiny_model, pubmedqa, "deepspeed")
    proc = start(job)
    deadline = time.monotonic() + 300
    while not (job / "checkpoints" / "latest").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = start(job)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0
    evs = events(out)
    assert evs[0]["event"] == "resumed" and evs[0]["step"] >= 2
    resumed = [e["loss"] for e in evs if e["event"] == "progress"]
    assert len(resumed) == 10 - evs[0]["step"]
    assert resumed == pytest.approx(ds[evs[0]["step"] :], rel=1e-3)
    # Only the latest checkpoint is kept, and it holds the LoRA weights, not the frozen layers.
    kept = list((job / "checkpoints").glob("global_step*"))
    assert len(kept) == 1
    import torch

    states = torch.load(next(kept[0].glob("*model_states.pt")), weights_only=False)["module"]
    assert any("lora_A" in k for k in states)
    assert not any(k.endswith("q_proj.base_layer.weight") for k in states)


def run_to_end(job: Path) -> dict:
    proc = start(job)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-2000:]
    return events(out)[-1]


def lora_distance(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return float(sum(((wa[k] - wb[k]) ** 2).sum() for k in wa) ** 0.5)


@pytest.mark.timeout(600)
def test_ewc_keeps_a_child_adapter_near_its_parent_and_forgetting_is_measured(
    tiny_model, pubmedqa, tmp_path
):
    parent = Path(
        run_to_end(make_job(tmp_path / "parent", tiny_model, pubmedqa, "torch", epochs=1))[
            "adapter_dir"
        ]
    )
    replay = examples(pubmedqa, slice(0, 8))
    distances = {}
    for ewc in (0.0, 1e6):
        done = run_to_end(
            make_job(
                tmp_path / f"child-{ewc}",
                tiny_model,
                pubmedqa,
                "torch",
                part=slice(40, 80),
                replay=replay,
                epochs=1,
                parent_adapter=str(parent),
                ewc_lambda=ewc,
                general_tokens=512,
            )
        )
        distances[ewc] = lora_distance(parent, Path(done["adapter_dir"]))
        # Perplexity on general English, with the adapter and without it (the base model).
        assert done["base_perplexity"] > 1 and done["perplexity"] > 1
        assert done["perplexity"] != done["base_perplexity"]
    assert distances[1e6] < 0.5 * distances[0.0], distances
