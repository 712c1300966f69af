from knowstream.monitor.v1 import monitor_pb2
from knowstream.retrieve.v1 import retrieve_pb2
from knowstream.trainer.v1 import trainer_pb2
from services.cli.status import describe, drift_summary, index_summary, training_summary


def test_each_part_is_summarized_and_described():
    drift = monitor_pb2.DriftStatus(questions_seen=40, streak=2, events=1)
    drift.reference.id = "ref-1"
    drift.windows.add(index=3, p_value=0.00123, drift=True)
    drift.gaps.add()  # open
    drift.gaps.add(closed_ms=5)
    job = trainer_pb2.Job(id="job-1", state="done", step=10, steps=10, adapter_id="a1b2")
    parts = {
        "index": index_summary(retrieve_pb2.IndexStats(chunks=9, documents=3)),
        "drift": drift_summary(drift),
        "training": training_summary([job], trainer_pb2.Policy(mode="auto")),
    }
    assert parts["drift"]["open_gaps"] == 1 and parts["drift"]["last_p_value"] == 0.0012
    assert parts["training"]["last_job_step"] == "10/10"
    lines = describe(parts)
    assert "3 documents, 9 chunks" in lines[0]
    assert "reference ref-1, 40 questions, last window 3 p=0.0012 DRIFT" in lines[1]
    assert lines[2] == "training: policy auto; last job job-1 done (step 10/10), adapter a1b2"


def test_nothing_yet_and_missing_parts():
    parts = {
        "drift": drift_summary(monitor_pb2.DriftStatus()),
        "training": training_summary([], trainer_pb2.Policy(mode="manual")),
    }
    assert describe(parts) == [
        "drift: reference none yet, 0 questions, no window yet, 0 events, 0 open knowledge gaps",
        "training: policy manual; no job yet",
    ]
    assert describe({}) == []
