"""Auth against the real stack (auth on, as `make up` runs it): every RPC of every service x
{no token, reader, writer, admin}; no client-chosen server paths; uploads checked before they
are stored; the audit trail on ks.audit and in `knowstream audit`; document access groups (two
tokens on one corpus: Search, Ask and AskStream); Triton's repository API behind the stack's
key."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.numpy import save

from knowstream.events.v1 import events_pb2
from knowstream.infer.v1 import infer_pb2, infer_pb2_grpc
from knowstream.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from knowstream.retrieve.v1 import retrieve_pb2, retrieve_pb2_grpc
from knowstream.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.cli.main import main as cli_main
from services.common.adapter_upload import upload_adapter
from services.common.auth import Role, parse_tokens, triton_admin_headers, triton_admin_key
from services.common.clients import sync_channel
from services.common.roles import required_role
from tests.integration.conftest import GROUP_READER, delete_documents, read_events, wait_for
from tests.utils.grpcapp import all_methods, call, full_name, message_class

pytestmark = pytest.mark.integration

SERVICE_OF = {
    "knowstream.embed.v1.EmbedService": "embed",
    "knowstream.retrieve.v1.RetrieveService": "retrieve",
    "knowstream.ingest.v1.IngestService": "ingest",
    "knowstream.infer.v1.InferService": "infer",
    "knowstream.infer.v1.AdapterAdminService": "infer",
    "knowstream.monitor.v1.MonitorService": "monitor",
    "knowstream.trainer.v1.TrainerService": "trainer",
}
# Admitted calls run: these requests make them fail validation instead of doing work.
HARMLESS = {"/knowstream.trainer.v1.TrainerService/Train": {"epochs": 999}}
METHODS = [m for m in all_methods() if m.containing_service.full_name in SERVICE_OF]
REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}


@pytest.fixture(scope="module")
def tokens(stack):
    return parse_tokens(stack.settings.tokens_file().read_text(encoding="utf-8"), "tokens.json")


def address(stack, method) -> str:
    return stack.settings.address(
        stack.service_port(SERVICE_OF[method.containing_service.full_name])
    )


def code_of(stack, method, secret: str) -> grpc.StatusCode:
    overrides = HARMLESS.get(full_name(method), {})
    with sync_channel(address(stack, method), token=secret) as chan:
        try:
            if overrides:
                cls = message_class(method.input_type)
                path, ser, de = full_name(method), cls.SerializeToString, cls.FromString
                chan.unary_unary(path, ser, de)(cls(**overrides), timeout=30)
            else:
                call(chan, method, timeout=30)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_every_rpc_of_every_service_by_role(stack, tokens):
    started_ms = int(time.time() * 1000)
    wrong = []
    for method in METHODS:
        needed = required_role(full_name(method))
        for who in ("none", "reader", "writer", "admin"):
            secret = tokens.by_name(who).secret if who != "none" else ""
            code = code_of(stack, method, secret)
            if who == "none":
                ok = code == grpc.StatusCode.UNAUTHENTICATED
            elif Role.parse(who) >= needed:
                ok = code not in REFUSED
            else:
                ok = code == grpc.StatusCode.PERMISSION_DENIED
            if not ok:
                wrong.append(f"{full_name(method)} as {who}: {code.name}")
    # Should an admitted Train have queued a job after all, it must not train for minutes.
    trainer = trainer_pb2_grpc.TrainerServiceStub(
        sync_channel(stack.settings.address(stack.settings.trainer_port))
    )
    for job in trainer.ListJobs(trainer_pb2.ListJobsRequest(limit=5), timeout=10).jobs:
        if job.created_ms >= started_ms and job.state in ("queued", "assembling", "training"):
            trainer.CancelJob(trainer_pb2.GetJobRequest(id=job.id), timeout=10)
    assert not wrong, "\n".join(wrong)


def test_the_cli_uses_the_run_dirs_admin_token_and_token_overrides(stack, tokens, capsys):
    assert cli_main(["adapters", "list", "--json"]) == 0
    capsys.readouterr()
    reader = tokens.by_name("reader").secret
    assert cli_main(["--token", reader, "adapters", "rollback"]) == 1
    err = capsys.readouterr().err
    assert "PERMISSION_DENIED" in err and "needs role admin" in err


@pytest.fixture(scope="module")
def admin(stack):
    return infer_pb2_grpc.AdapterAdminServiceStub(
        sync_channel(stack.settings.address(stack.settings.infer_port))
    )


def fake_adapter(path, seed: int):
    """A tiny but valid LoRA adapter (not loaded: only registered)."""
    path.mkdir(parents=True)
    a = np.random.default_rng(seed).normal(size=(4, 8)).astype(np.float32)
    (path / "adapter_config.json").write_text(json.dumps(CONFIG), encoding="utf-8")
    (path / "adapter_model.safetensors").write_bytes(save({"m.q_proj.lora_A.weight": a}))
    return path


def refused_quickly(stack, fn) -> str:
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        fn()
    assert time.monotonic() - start < 1, f"took {time.monotonic() - start:.2f}s"
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert stack.health("infer") == "SERVING"
    return err.value.details()


def test_register_reads_only_inside_the_import_directory(stack, admin, tmp_path):
    root = stack.settings.import_root()
    fake_adapter(root / "ok", 1)
    fake_adapter(tmp_path / "outside", 2)
    (root / "zero").mkdir()
    (root / "zero" / "adapter_config.json").write_text(json.dumps(CONFIG), encoding="utf-8")
    (root / "zero" / "adapter_model.safetensors").symlink_to("/dev/zero")
    (root / "out").symlink_to(tmp_path / "outside")

    def register(path):
        return admin.RegisterAdapter(infer_pb2.RegisterAdapterRequest(path=path), timeout=30)

    for path in (str(tmp_path / "outside"), "../../outside", "/dev", "zero", "out"):
        assert "import directory" in refused_quickly(stack, lambda p=path: register(p))
    assert len(register("ok").id) == 16
    assert len(register(str(root / "ok")).id) == 16


def test_uploads_are_checked_before_anything_is_stored(stack, admin, tmp_path):
    before = sorted(p.name for p in stack.settings.adapter_dir.iterdir())
    bad = fake_adapter(tmp_path / "bad", 3)
    (bad / "adapter_model.safetensors").write_bytes(b"\x80\x04\x95 a pickle, not safetensors")
    details = refused_quickly(stack, lambda: upload_adapter(admin, bad, timeout=30))
    assert "not safetensors" in details
    assert sorted(p.name for p in stack.settings.adapter_dir.iterdir()) == before
    status = upload_adapter(admin, fake_adapter(tmp_path / "good", 4), timeout=30)
    assert status.rank == 4 and json.loads(status.lineage_json)["registered_by"] == "admin"


def test_admin_calls_are_on_the_audit_topic_and_in_the_cli(stack, tokens, capsys):
    writer = tokens.by_name("writer").secret
    chan = sync_channel(stack.settings.address(stack.settings.infer_port), token=writer)
    with chan, pytest.raises(grpc.RpcError):
        infer_pb2_grpc.AdapterAdminServiceStub(chan).Promote(
            infer_pb2.PromoteRequest(reason="audit test"), timeout=10
        )
    event = read_events(
        stack.settings,
        stack.settings.topic_audit,
        events_pb2.AuditEvent,
        lambda e: e.who == "writer" and "audit test" in e.request,
    )
    assert event.code == "PERMISSION_DENIED" and event.method.endswith("/Promote")
    assert event.service == "infer" and event.role == "writer"

    def in_cli() -> bool:
        capsys.readouterr()
        assert cli_main(["audit", "--json", "--who", "writer"]) == 0
        lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        return any(x["method"].endswith("/Promote") for x in lines)

    wait_for(in_cli, 30, "the refused Promote in `knowstream audit`")


def test_health_stays_open(stack):
    with sync_channel(stack.settings.address(stack.settings.trainer_port), token="") as chan:
        reply = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# -- document access groups --------------------------------------------------------------------

QUESTION = "Does zorvatinib block the KQ7 kinase in glioblastoma?"


@pytest.fixture(scope="module")
def grouped(stack, tokens) -> Iterator[tuple[str, str]]:
    """One corpus, two documents on one topic: one in the "oncology" access group, one public.
    Returns their ids (restricted, public) once both are searchable."""
    suffix = uuid.uuid4().hex[:8]
    restricted, public = f"onc-{suffix}", f"pub-{suffix}"
    source = f"test-groups-{suffix}"
    docs = [
        ingest_pb2.Document(
            id=restricted,
            title="Zorvatinib in glioblastoma",
            text="Zorvatinib blocks the KQ7 kinase in glioblastoma: in the ZORVA-2 trial 41 of "
            "60 patients responded to zorvatinib. " * 3,
            metadata=events_pb2.DocumentMetadata(source=source, access_groups=["Oncology"]),
        ),
        ingest_pb2.Document(
            id=public,
            title="Zorvatinib dosing",
            text="Zorvatinib is taken once a day with food; a KQ7 kinase assay guides the dose "
            "of zorvatinib in glioblastoma clinics. " * 3,
            metadata=events_pb2.DocumentMetadata(source=source),
        ),
        ingest_pb2.Document(
            id=f"bad-{suffix}",
            text="A group name with a space is refused.",
            metadata=events_pb2.DocumentMetadata(access_groups=["no spaces"]),
        ),
    ]
    writer = tokens.by_name("writer").secret
    with sync_channel(stack.settings.address(stack.settings.ingest_port), token=writer) as chan:
        reply = ingest_pb2_grpc.IngestServiceStub(chan).IngestDocuments(
            ingest_pb2.IngestDocumentsRequest(documents=docs), timeout=60
        )
    assert (reply.accepted, reply.rejected) == (2, 1), reply
    assert "access group" in reply.results[2].error
    admin = tokens.by_name("admin").secret

    def indexed() -> bool:
        hits = search_as(stack, admin, QUESTION, sources=[source])
        lag = retrieve_stub(stack, admin).GetIndexStats(
            retrieve_pb2.GetIndexStatsRequest(), timeout=10
        )
        return {restricted, public} <= {h.doc_id for h in hits} and lag.bm25_lag_chunks == 0

    wait_for(indexed, 180, "both documents to be searchable (admin reads every group)")
    yield restricted, public
    # Later modules search the shared index with PubMedQA questions ("food" finds the dosing one).
    delete_documents(stack.settings, [restricted, public])


def retrieve_stub(stack, secret: str) -> retrieve_pb2_grpc.RetrieveServiceStub:
    chan = sync_channel(stack.settings.address(stack.settings.retrieve_port), token=secret)
    return retrieve_pb2_grpc.RetrieveServiceStub(chan)


def search_as(stack, secret: str, query: str, **filters) -> list[retrieve_pb2.SearchHit]:
    access = filters.pop("access", None)
    request = retrieve_pb2.SearchRequest(
        query=query, k=20, filters=retrieve_pb2.SearchFilters(**filters)
    )
    if access is not None:
        request.filters.access.SetInParent()
        request.filters.access.groups.extend(access)
    return list(retrieve_stub(stack, secret).Search(request, timeout=30).hits)


def ask_as(stack, secret: str, stream: bool, **filters) -> set[str]:
    """The doc ids Ask (or AskStream) cites for the question."""
    access = filters.pop("access", None)
    request = infer_pb2.AskRequest(
        question=QUESTION, k=5, max_tokens=4, filters=retrieve_pb2.SearchFilters(**filters)
    )
    if access is not None:
        request.filters.access.SetInParent()
        request.filters.access.groups.extend(access)
    with sync_channel(stack.settings.address(stack.settings.infer_port), token=secret) as chan:
        stub = infer_pb2_grpc.InferServiceStub(chan)
        if stream:
            finals = [c.final for c in stub.AskStream(request, timeout=120) if c.HasField("final")]
            assert len(finals) == 1
            response = finals[0]
        else:
            response = stub.Ask(request, timeout=120)
    return {c.doc_id for c in response.citations}


def test_search_shows_a_groups_document_only_to_readers_of_that_group(stack, tokens, grouped):
    restricted, public = grouped
    reader = tokens.by_name("reader").secret
    oncologist = tokens.by_name(GROUP_READER).secret
    for mode_filters in ({}, {"doc_ids": [restricted]}, {"sources": [f"test-groups-{public[4:]}"]}):
        for_reader = {h.doc_id for h in search_as(stack, reader, QUESTION, **mode_filters)}
        assert restricted not in for_reader
        for_oncologist = {h.doc_id for h in search_as(stack, oncologist, QUESTION, **mode_filters)}
        assert restricted in for_oncologist
    assert public in {h.doc_id for h in search_as(stack, reader, QUESTION)}
    # Naming the group in the request does not widen a token's groups; it can narrow them.
    widened = search_as(stack, reader, QUESTION, doc_ids=[restricted], access=["oncology"])
    assert widened == []
    narrowed = search_as(stack, oncologist, QUESTION, doc_ids=[restricted], access=[])
    assert narrowed == []
    hit = search_as(stack, oncologist, QUESTION, doc_ids=[restricted])[0]
    assert list(hit.metadata.access_groups) == ["oncology"]


@pytest.mark.parametrize("stream", [False, True], ids=["Ask", "AskStream"])
def test_ask_cites_a_groups_document_only_to_readers_of_that_group(stack, tokens, grouped, stream):
    restricted, public = grouped
    source = [f"test-groups-{public[4:]}"]
    reader = tokens.by_name("reader").secret
    oncologist = tokens.by_name(GROUP_READER).secret
    assert ask_as(stack, reader, stream, sources=source) == {public}
    assert ask_as(stack, reader, stream, sources=source, access=["oncology"]) == {public}
    assert ask_as(stack, oncologist, stream, sources=source) == {restricted, public}
    assert ask_as(stack, oncologist, stream, sources=source, access=[]) == {public}
    # The services' token (admin) reads every group when it asks for itself.
    assert restricted in ask_as(stack, tokens.by_name("admin").secret, stream, sources=source)


def test_tritons_repository_api_needs_the_stacks_key(stack):
    import urllib.error
    import urllib.request

    import tritonclient.grpc as triton_grpc
    from tritonclient.utils import InferenceServerException

    client = triton_grpc.InferenceServerClient(
        stack.settings.address(stack.settings.triton_grpc_port)
    )
    with pytest.raises(InferenceServerException, match="restricted"):
        client.get_model_repository_index()
    with pytest.raises(InferenceServerException, match="restricted"):
        client.unload_model(stack.settings.triton_model)
    with pytest.raises(InferenceServerException, match="restricted"):
        client.get_system_shared_memory_status()
    index = client.get_model_repository_index(headers=triton_admin_headers(stack.settings))
    assert stack.settings.triton_model in {m.name for m in index.models}
    assert client.is_model_ready(stack.settings.triton_model)  # health and metadata stay open
    url = f"http://{stack.settings.address(stack.settings.triton_http_port)}/v2/repository/index"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=10)
    assert err.value.code == 403
    headers = triton_admin_headers(stack.settings, "http")
    with urllib.request.urlopen(
        urllib.request.Request(url, method="POST", headers=headers), timeout=10
    ) as reply:
        assert reply.status == 200
    assert triton_admin_key(stack.settings) not in (stack.run_dir / "stack.json").read_text(
        encoding="utf-8"
    )
