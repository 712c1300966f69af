import numpy as np

from services.common.embedding import Embedder
from services.common.models import resolve_model_dir
from services.common.settings import CommonSettings


def test_onnx_runtime_matches_torch_on_padded_batches():
    model_dir = resolve_model_dir("all-MiniLM-L6-v2")
    cache = CommonSettings().cache_dir
    onnx = Embedder(model_dir, "minilm", runtime="onnx", cache_dir=cache, batch_size=4)
    torch_ = Embedder(model_dir, "minilm", runtime="torch", batch_size=4)
    texts = ["x", "Aspirin lowers fever in adults.", "word " * 300, "Short.", "Another one here."]
    a, b = onnx.embed(texts), torch_.embed(texts)
    assert a.shape == (5, 384)
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert (a * b).sum(1).min() > 0.9999
    # Order is preserved although the batch is processed sorted by length.
    single = onnx.embed([texts[1]])[0]
    assert float(single @ a[1]) > 0.9999
