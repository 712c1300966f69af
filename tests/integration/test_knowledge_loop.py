"""The knowledge loop through the real stack: documents ingested since a time become a knowledge
job (probes by tier scored through Triton's score mode, augmented continued pretraining with
early stopping on dev probes, the knowledge gate), an adapter that learned nothing significant is
refused with the figures named, and `knowstream eval knowledge` reports the tiers."""

from __future__ import annotations

import json
import time

import pytest

from knowstream.infer.v1 import infer_pb2, infer_pb2_grpc
from knowstream.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from knowstream.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.cli.documents import pubmedqa_document
from services.cli.main import main as cli_main
from services.common.clients import sync_channel
from tests.integration.conftest import delete_documents, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trainer(stack):
    return trainer_pb2_grpc.TrainerServiceStub(
        sync_channel(stack.settings.address(stack.settings.trainer_port))
    )


@pytest.fixture(scope="module")
def fresh(stack, pubmedqa):
    """Six abstracts under ids no other test uses (so they are new chunks now), ingested after
    ``since``; their PubMedQA form is written to a file (conclusions = tier-P text)."""
    items = {f"kl{k}": v for k, v in list(pubmedqa.items())[200:206]}
    # The trainer reads client-named files only inside its import directory.
    path = stack.settings.import_root() / "fresh.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(items), encoding="utf-8")
    since = int(time.time() * 1000) - 1000
    ingest = ingest_pb2_grpc.IngestServiceStub(
        sync_channel(stack.settings.address(stack.settings.ingest_port))
    )
    docs = [pubmedqa_document(k, v) for k, v in items.items()]
    reply = ingest.IngestDocuments(ingest_pb2.IngestDocumentsRequest(documents=docs), timeout=60)
    assert reply.accepted == len(items), reply
    yield path, since, items
    delete_documents(stack.settings, items)  # copies of PubMedQA abstracts under other ids


def test_score_rpc_ranks_raw_continuations(stack):
    infer = infer_pb2_grpc.InferServiceStub(
        sync_channel(stack.settings.address(stack.settings.infer_port))
    )
    reply = infer.Score(
        infer_pb2.ScoreRequest(
            prompt="The capital of France is",
            candidates=[" Paris", " a banana split"],
            adapter="base",
        ),
        timeout=60,
    )
    assert reply.adapter == "base" and len(reply.logprobs) == 2
    assert reply.chosen == 0 and reply.logprobs[0] > reply.logprobs[1]
    import grpc

    with pytest.raises(grpc.RpcError) as err:
        infer.Score(infer_pb2.ScoreRequest(prompt="x", candidates=["only one"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_knowledge_job_without_significant_gain_is_refused(stack, trainer, fresh):
    path, since, items = fresh
    request = trainer_pb2.TrainRequest(
        mode=trainer_pb2.TRAIN_MODE_KNOWLEDGE,
        since_ms=since,
        parent="base",
        labelled_data=str(path),
        # One short pass at the test stack's sizes learns next to nothing: the gate must see it.
        epochs=1,
        max_tokens=96,
        micro_batch=2,
        no_rollout=True,
        reason="knowledge loop test",
    )
    job = trainer.Train(request, timeout=30)
    done = wait_for(
        lambda: (
            (j := trainer.GetJob(trainer_pb2.GetJobRequest(id=job.id), timeout=10)).state
            in ("registered", "rejected", "failed")
            and j
        ),
        600,
        "the knowledge job to end",
        interval_s=2,
    )
    assert done.state == "rejected", (done.state, done.error, list(done.gate.reasons))
    knowledge = json.loads(done.dataset_json)["knowledge"]
    trained, control = knowledge["trained_documents"], knowledge["control_documents"]
    assert set(trained) | set(control) == set(items) and trained
    assert knowledge["forms"]["raw"] == len(trained) and knowledge["forms"].get("qa")
    gate = done.gate.knowledge
    assert gate.probe_set == knowledge["probe_set"]
    assert gate.m_probes + gate.dev_probes > 0 and gate.r_probes > 0
    # To-learn probes are the parent's failures: the parent scores 0 on them by construction.
    assert gate.parent.m == 0 and gate.parent.c == 0
    assert list(gate.dev_curve), "early stopping scored the dev probes"
    reasons = list(done.gate.reasons)
    assert any(r.startswith("tier M") and "95% lower bound" in r for r in reasons), reasons
    assert any("general-English perplexity" in r for r in reasons), reasons
    assert not done.gate.passed


def test_eval_knowledge_reports_every_tier(stack, fresh, capsys):
    path, _, _ = fresh
    code = cli_main(["eval", "knowledge", "--docs", str(path), "--adapter", "base", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) >= {"M", "P", "C", "R", "n", "ci95"}
    assert result["adapter"] == "base" and not result["to_learn"]
    assert result["n"]["M"] > 0 and result["n"]["R"] > 0
    for tier in ("M", "R"):
        low, high = result["ci95"][tier]
        assert 0 <= low <= result[tier] <= high <= 1
    bad = cli_main(["eval", "knowledge", "--docs", str(path.parent / "missing.json")])
    assert bad == 2
