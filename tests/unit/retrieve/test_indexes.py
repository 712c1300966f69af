import numpy as np

from services.retrieve.dense import FaissBackend, Filters, MilvusBackend, VectorMeta
from services.retrieve.lexical import LexicalIndex


def unit(rows, seed=0):
    v = np.random.default_rng(seed).normal(size=(rows, 16)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_lexical_add_remove_search():
    idx = LexicalIndex()
    idx.add([1, 2, 3], ["Aspirin reduces fever.", "Statutes of limitation.", "Fever in children."])
    idx.rebuild()
    assert [i for i, _ in idx.search("fevers", 3)][:2] in ([1, 3], [3, 1])  # stemmed match
    mask = np.zeros(4, dtype=bool)
    mask[3] = True
    assert [i for i, _ in idx.search("fever", 3, mask)] == [3]
    idx.remove([3])
    assert idx.pending_changes == 1
    idx.rebuild()
    assert [i for i, _ in idx.search("fever", 3)] == [1]
    assert idx.search("unknownword", 3) == []


def test_faiss_hnsw_tombstones_and_masks():
    v = unit(200)
    for kind in ("hnsw", "flat"):
        b = FaissBackend(16, kind)
        b.add(np.arange(200), v, [])
        assert b.search(v[5], 1, None, Filters())[0][0] == 5
        b.remove(np.array([5]))
        live = np.ones(200, dtype=bool)
        live[5] = False
        hits = b.search(v[5], 3, live if b.needs_mask else None, Filters())
        assert 5 not in [i for i, _ in hits]
        assert len(b) == 199


def test_milvus_lite_backend(tmp_path):
    v = unit(20, seed=1)
    b = MilvusBackend(16, str(tmp_path / "m.db"), "chunks")
    metas = [VectorMeta(f"d{i}", "law" if i % 2 else "medicine", "s") for i in range(20)]
    b.add(np.arange(20), v, metas)
    assert b.search(v[4], 1, None, Filters())[0][0] == 4
    law = b.search(v[4], 5, None, Filters(domains=frozenset({"law"})))
    assert law and all(i % 2 for i, _ in law)
    b.remove(np.array([4]))
    assert 4 not in [i for i, _ in b.search(v[4], 3, None, Filters())]


def embedded(i: int, vector: np.ndarray, domain: str = "d"):
    from knowstream.events.v1 import events_pb2

    chunk = events_pb2.ChunkEvent(
        doc_id=f"doc{i}",
        chunk_id=f"doc{i}#h#0",
        chunk_count=1,
        content_hash="h",
        text=f"chunk number {i} about topic{i % 10}",
        metadata=events_pb2.DocumentMetadata(domain=domain, source="s"),
    )
    return events_pb2.EmbeddedChunk(chunk=chunk, vector=vector.tolist(), model="m")


def test_hybrid_index_compaction_keeps_changes_made_during_the_build():
    import asyncio

    from services.retrieve.index import HybridIndex

    v = unit(3000, seed=2)
    index = HybridIndex(FaissBackend(16, "hnsw"), 16)
    index.add([embedded(i, v[i]) for i in range(2500)])
    index.remove([f"doc{i}#h#0" for i in range(1500)])
    assert index.needs_compaction()

    index_of_1600 = index.by_chunk_id["doc1600#h#0"]

    async def compact_while_changing():
        task = asyncio.ensure_future(index.compact())
        await asyncio.sleep(0)  # the build runs in a thread; change the index meanwhile
        index.add([embedded(i, v[i]) for i in range(2500, 3000)])
        index.remove(["doc1600#h#0"])
        await task

    asyncio.run(compact_while_changing())
    # The removal made during the build was replayed onto the new graph as a tombstone.
    assert index.dense.tombstones == {index_of_1600}
    assert len(index) == 1000 + 500 - 1
    hits = index.search_dense(v[2700], 3, Filters(), None)
    assert hits[0][0] == index.by_chunk_id["doc2700#h#0"]
    assert index.by_chunk_id.get("doc1600#h#0") is None
    assert all(
        index.records[i].doc_id != "doc1600"
        for i, _ in index.search_dense(v[1600], 5, Filters(), None)
    )
    lowest_removed = index.search_dense(v[10], 5, Filters(), None)
    assert all(int(index.records[i].doc_id[3:]) >= 1500 for i, _ in lowest_removed)
