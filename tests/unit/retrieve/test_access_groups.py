"""Document access groups: names, tokens, ingest, the filter inside each engine (faiss ID
selectors, bm25s weight masks, the Milvus expression), the retrieve service behind the auth
interceptor with tokens of different groups, and what infer passes on for its caller."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from pydantic import SecretStr

from knowstream.events.v1 import events_pb2
from knowstream.retrieve.v1 import retrieve_pb2, retrieve_pb2_grpc
from services.common.access import InvalidGroups, narrow, parse_groups, readable
from services.common.auth import CALLER_SCOPE, Role, TokenError, parse_tokens
from services.common.clients import sync_channel
from services.common.settings import CommonSettings
from services.infer.answerer import caller_filters
from services.ingest.documents import InvalidDocument, clean_document
from services.ingest.raw import parse_raw_record
from services.retrieve.dense import FaissBackend, Filters, MilvusBackend, VectorMeta
from services.retrieve.index import HybridIndex
from services.retrieve.service import QueryEmbedder, RetrieveServicer
from services.retrieve.settings import RetrieveSettings
from tests.utils.grpcapp import RunningApp

MB = 1 << 20
SECRET = "0123456789abcdef-secret"
# doc i's groups: public, oncology, oncology+law, law, cardiology, ...
GROUPS = [(), ("oncology",), ("law", "oncology"), ("law",), ("cardiology",)]


def group_of(i: int) -> tuple[str, ...]:
    return GROUPS[i % len(GROUPS)]


def visible(scope) -> set[int]:
    return {i for i in range(200) if readable(group_of(i), scope)}


# -- names and scopes ----------------------------------------------------------------------------


def test_group_names_are_validated_and_lowercased():
    assert parse_groups(["Oncology", " law ", ""]) == {"oncology", "law"}
    assert parse_groups("oncology, law,,") == {"oncology", "law"}
    for bad in (["has space"], ["-leading"], ["x" * 65], ["semi;colon"], ["*"]):
        with pytest.raises(InvalidGroups):
            parse_groups(bad)
    assert parse_groups(["*"], allow_all=True) == {"*"}
    with pytest.raises(InvalidGroups, match="at most 32"):
        parse_groups([f"g{i}" for i in range(33)])


def test_a_request_narrows_the_callers_scope_and_never_widens_it():
    assert narrow(None, None) is None  # admin, no request: everything
    assert narrow(None, ["Oncology"]) == {"oncology"}  # infer passing its caller's groups
    assert narrow(None, []) == frozenset()  # public only
    assert narrow(frozenset({"law"}), None) == {"law"}
    assert narrow(frozenset({"law"}), ["law", "oncology"]) == {"law"}  # no widening
    assert narrow(frozenset(), ["oncology"]) == frozenset()
    assert narrow(frozenset({"law"}), ["*"]) == frozenset()  # "*" names no group
    assert readable((), frozenset()) and not readable(("law",), frozenset())
    assert readable(("law", "oncology"), frozenset({"oncology"}))


def test_tokens_carry_groups_and_roles_have_defaults():
    rows = [
        {"name": "admin", "role": "admin", "secret": "a" + SECRET},
        {"name": "reader", "role": "reader", "secret": "r" + SECRET},
        {"name": "onc", "role": "reader", "secret": "o" + SECRET, "groups": ["Oncology"]},
        {"name": "all", "role": "writer", "secret": "w" + SECRET, "groups": ["*"]},
        {"name": "narrow-admin", "role": "admin", "secret": "n" + SECRET, "groups": ["law"]},
    ]
    tokens = parse_tokens(json.dumps({"tokens": rows}), "test")
    scopes = {t.name: t.scope for t in tokens.tokens}
    assert scopes == {
        "admin": None,
        "reader": frozenset(),
        "onc": {"oncology"},
        "all": None,
        "narrow-admin": {"law"},
    }
    again = parse_tokens(tokens.to_json(None), "again")
    assert [t.scope for t in again.tokens] == list(scopes.values())
    assert "groups" not in json.loads(tokens.to_json())["tokens"][0]  # default stays default
    for groups, error in ((["bad name"], "access group"), (["*", "law"], "other groups")):
        row = {"name": "x", "role": "reader", "secret": SECRET, "groups": groups}
        with pytest.raises(TokenError, match=error):
            parse_tokens(json.dumps([row]), "test")
    with pytest.raises(TokenError, match="must be a list"):
        parse_tokens(json.dumps([{**rows[1], "groups": "law"}]), "test")
    assert Role.ADMIN.label == "admin"


# -- ingest ----------------------------------------------------------------------------------


def test_ingest_validates_groups_and_keeps_public_hashes():
    public = clean_document("d", "T", "Some text.", max_bytes=MB)
    # The hash of a public document is what it was before access groups existed.
    legacy = __import__("hashlib").sha256(json.dumps(["T", "Some text.", "", "", [], []]).encode())
    assert public.content_hash == legacy.hexdigest()
    onc = clean_document("d", "T", "Some text.", access_groups=["Oncology"], max_bytes=MB)
    assert onc.access_groups == ("oncology",) and onc.content_hash != public.content_hash
    via_attribute = clean_document(
        "d", "T", "Some text.", attributes={"access_groups": "oncology", "k": "v"}, max_bytes=MB
    )
    assert via_attribute.access_groups == ("oncology",)
    assert via_attribute.attributes == {"k": "v"}  # never left as a look-alike attribute
    with pytest.raises(InvalidDocument, match="access group"):
        clean_document("d", "", "x", access_groups=["no spaces"], max_bytes=MB)
    with pytest.raises(InvalidDocument, match="for tokens"):
        clean_document("d", "", "x", access_groups=["*"], max_bytes=MB)
    with pytest.raises(InvalidDocument, match="at most"):
        clean_document("d", "", "x", access_groups=[f"g{i}" for i in range(40)], max_bytes=MB)


def test_raw_json_records_carry_groups():
    nested = {"id": "a", "text": "t", "metadata": {"access_groups": ["oncology", "law"]}}
    assert parse_raw_record(json.dumps(nested).encode()).access_groups == ("oncology", "law")
    top = {"id": "a", "text": "t", "access_groups": "oncology,law"}
    assert parse_raw_record(json.dumps(top).encode()).access_groups == ("oncology", "law")
    from services.common.kafka import BadEvent

    with pytest.raises(BadEvent, match="access_groups"):
        parse_raw_record(json.dumps({"id": "a", "text": "t", "access_groups": 3}).encode())
    proto = events_pb2.RawDocument(
        id="p", text="t", metadata=events_pb2.DocumentMetadata(access_groups=["law"])
    )
    assert parse_raw_record(proto.SerializeToString()).access_groups == ("law",)


# -- the engines -----------------------------------------------------------------------------


def unit(rows: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(rows, 16)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def embedded(i: int, vector: np.ndarray) -> events_pb2.EmbeddedChunk:
    chunk = events_pb2.ChunkEvent(
        doc_id=f"doc{i}",
        chunk_id=f"doc{i}#h#0",
        chunk_count=1,
        content_hash="h",
        text=f"statins and tumour markers, note {i}",
        metadata=events_pb2.DocumentMetadata(
            domain="medicine", source="s", access_groups=group_of(i)
        ),
    )
    return events_pb2.EmbeddedChunk(chunk=chunk, vector=vector.tolist(), model="m")


def hybrid(kind: str) -> tuple[HybridIndex, np.ndarray]:
    v = unit(200)
    index = HybridIndex(FaissBackend(16, kind), 16)
    index.exact_scan_limit = 0  # 200 // 20 = 10 allowed chunks at most take the exact scan
    index.add([embedded(i, v[i]) for i in range(200)])
    index.lexical.rebuild()
    return index, v


SCOPES = [frozenset(), frozenset({"oncology"}), frozenset({"law"}), frozenset({"x", "law"})]


@pytest.mark.parametrize("kind", ["hnsw", "flat"])
@pytest.mark.parametrize("scope", SCOPES, ids=lambda s: ",".join(sorted(s)) or "public")
def test_faiss_and_bm25_return_only_readable_chunks(kind, scope):
    index, v = hybrid(kind)
    filters = Filters(groups=scope)
    mask = index.filter_mask(filters)
    assert mask is not None and set(np.flatnonzero(mask)) == visible(scope)
    assert len(np.flatnonzero(mask)) > 10  # the faiss selector path, not the exact scan
    ids = lambda hits: {int(index.records[i].doc_id[3:]) for i, _ in hits}  # noqa: E731
    for probe in (1, 2, 3, 4):  # the nearest vector may be one the caller may not read
        dense = index.search_dense(v[probe], 50, filters, mask)
        assert dense and ids(dense) <= visible(scope)
        if readable(group_of(probe), scope):
            assert int(index.records[dense[0][0]].doc_id[3:]) == probe
    bm25 = index.search_bm25("statins tumour", 200, mask)
    assert ids(bm25) == visible(scope)
    # Access groups combine with the other filters.
    both = Filters(doc_ids=frozenset({"doc1", "doc0"}), groups=scope)
    assert ids(index.search_bm25("statins", 10, index.filter_mask(both))) == (
        {0, 1} & visible(scope)
    )


def test_no_scope_means_no_mask_and_a_new_group_set_is_public_to_nobody():
    index, v = hybrid("hnsw")
    assert index.filter_mask(Filters()) is None
    index.add([embedded(900, v[0])])  # doc900: group set "" again (900 % 5 == 0)
    extra = events_pb2.EmbeddedChunk()
    extra.CopyFrom(embedded(901, v[1]))
    extra.chunk.metadata.ClearField("access_groups")
    extra.chunk.metadata.access_groups.append("genetics")
    extra.chunk.chunk_id, extra.chunk.doc_id = "doc901#h#0", "doc901"
    index.add([extra])
    mask = index.filter_mask(Filters(groups=frozenset({"oncology"})))
    assert mask[index.by_chunk_id["doc900#h#0"]] and not mask[index.by_chunk_id["doc901#h#0"]]
    index.remove(["doc6#h#0"])  # removed chunks stay out whatever the scope
    assert not index.filter_mask(Filters(groups=frozenset({"oncology"})))[6]


def test_milvus_filters_groups_in_its_expression(tmp_path):
    expr = MilvusBackend._expr
    assert expr(Filters()) == ""
    assert expr(Filters(groups=frozenset())) == "array_length(access_groups) == 0"
    assert expr(Filters(domains=frozenset({"law"}), groups=frozenset({"b", "a"}))) == (
        'domain in ["law"] and (array_length(access_groups) == 0 or '
        'array_contains_any(access_groups, ["a", "b"]))'
    )
    v = unit(20, seed=1)
    b = MilvusBackend(16, str(tmp_path / "m.db"), "chunks")
    b.add(np.arange(20), v, [VectorMeta(f"d{i}", "m", "s", group_of(i)) for i in range(20)])
    for scope in SCOPES:
        hits = {i for i, _ in b.search(v[1], 20, None, Filters(groups=scope))}
        assert hits == {i for i in range(20) if readable(group_of(i), scope)}
    assert {i for i, _ in b.search(v[1], 20, None, Filters())} == set(range(20))


# -- the retrieve service behind the interceptor -----------------------------------------------

TOKENS = {
    "reader": ("reader", None),
    "oncologist": ("reader", ["oncology"]),
    "admin": ("admin", None),
}


@pytest.fixture(scope="module")
def retrieve():
    rows = [
        {"name": n, "role": r, "secret": f"{n}-{SECRET}", **({"groups": g} if g else {})}
        for n, (r, g) in TOKENS.items()
    ]
    settings = CommonSettings(
        auth_tokens=SecretStr(json.dumps({"tokens": rows})), kafka_bootstrap="127.0.0.1:9"
    )
    index, v = hybrid("hnsw")

    async def encode(text: str) -> np.ndarray:
        return v[1]  # doc1 (oncology) is the nearest chunk of every query

    def register(app):
        servicer = RetrieveServicer(RetrieveSettings(), QueryEmbedder(encode, 0))
        servicer.attach(SimpleNamespace(index=index))  # type: ignore[arg-type]
        retrieve_pb2_grpc.add_RetrieveServiceServicer_to_server(servicer, app.server)

    running = RunningApp(settings, register)
    yield running
    running.close()


def search(server, who: str, access: list[str] | None = None, mode=0) -> set[int]:
    request = retrieve_pb2.SearchRequest(query="statins tumour", k=100, mode=mode)
    if access is not None:
        request.filters.access.SetInParent()
        request.filters.access.groups.extend(access)
    with sync_channel(server.address, token=f"{who}-{SECRET}") as chan:
        reply = retrieve_pb2_grpc.RetrieveServiceStub(chan).Search(request, timeout=10)
    return {int(h.doc_id[3:]) for h in reply.hits}


@pytest.mark.parametrize("mode", [1, 2, 3])  # hybrid, dense, bm25
def test_search_shows_each_token_only_its_groups(retrieve, mode):
    public, onc = visible(frozenset()), visible(frozenset({"oncology"}))
    assert search(retrieve, "reader", mode=mode) <= public
    assert search(retrieve, "oncologist", mode=mode) <= onc
    assert 1 in search(retrieve, "oncologist", mode=mode)  # the nearest, in oncology
    assert 1 not in search(retrieve, "reader", mode=mode)
    # A reader cannot widen its groups, only narrow them.
    assert search(retrieve, "reader", ["oncology"], mode) <= public
    assert search(retrieve, "oncologist", [], mode) <= public
    # Admin reads everything, or what it names (infer does so for its caller).
    assert search(retrieve, "admin", mode=mode) - onc  # law and cardiology too
    assert search(retrieve, "admin", ["oncology"], mode) <= onc


# -- infer passes its caller's groups on -------------------------------------------------------


def test_infer_searches_with_the_callers_groups():
    def filters_as(scope, request: retrieve_pb2.SearchFilters) -> retrieve_pb2.SearchFilters:
        async def run() -> retrieve_pb2.SearchFilters:
            CALLER_SCOPE.set(scope)
            return caller_filters(request)

        return asyncio.run(run())

    plain = retrieve_pb2.SearchFilters(domains=["medicine"])
    out = filters_as(None, plain)  # admin / auth off: no restriction
    assert not out.HasField("access") and list(out.domains) == ["medicine"]
    out = filters_as(frozenset(), plain)  # a reader without groups: public only
    assert out.HasField("access") and list(out.access.groups) == []
    out = filters_as(frozenset({"oncology"}), plain)
    assert list(out.access.groups) == ["oncology"]
    # What the request names can narrow the caller's groups, never widen them.
    asked = retrieve_pb2.SearchFilters(access=retrieve_pb2.AccessGroups(groups=["law"]))
    assert list(filters_as(frozenset({"oncology"}), asked).access.groups) == []
    assert list(filters_as(None, asked).access.groups) == ["law"]
    assert not plain.HasField("access")  # the request itself is left as it was


def test_an_unknown_token_is_still_unauthenticated(retrieve):
    chan = sync_channel(retrieve.address, token="nobody-0123456789abcdef")
    with chan, pytest.raises(grpc.RpcError) as err:
        retrieve_pb2_grpc.RetrieveServiceStub(chan).Search(
            retrieve_pb2.SearchRequest(query="q"), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
