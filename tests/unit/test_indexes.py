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
