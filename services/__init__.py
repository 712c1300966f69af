"""knowstream services: one package per service plus the shared library in ``services.common``."""

import os

# OpenMP worker threads (faiss, torch) spin after each parallel region by default. On a small
# machine they then steal the cores that ONNX Runtime needs next: a query embedding measured
# 13 ms beside a spinning faiss pool and 5.5 ms with passive waiting. Set before any OpenMP
# library is loaded; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
