"""Test setup: Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before triton decorates any kernel, i.e. before vlood_fast (and
so vlood_fast.kernels) is imported anywhere in the test session.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"
# torch.compile's CPU kernels (test_compile.py) bring a second OpenMP team; spin-waiting teams
# starve each other on small machines and slow every later test ~10x (see benchmarks/NOTES.md)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.pop("VLOOD_FAST_BACKEND", None)  # tests choose backends explicitly

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI replays a fixed set of examples (no flaky red builds); locally hypothesis explores
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng():
    """A fresh, seeded generator per test: random inputs, never zeros, reproducible."""
    return torch.Generator().manual_seed(1234)
