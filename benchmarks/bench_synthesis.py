"""OGEN batched synthesis, forward + backward: time, bytes saved for backward, peak memory.

    pytest benchmarks/bench_synthesis.py

Providers run side by side: 'reference' (explicit U x C similarity, topk, gather, the module's
forward) and 'torch' (bank streamed in chunks with a running top-k, closed-form chunked
backward; on CUDA add 'triton'). The generator is in train mode (attention dropout on); all
three inputs and the generator's parameters require grad; loss = sum(features * R), R fixed.

Peak memory: each provider runs in its own child process (``profiling.child_peak_rss``):
inputs and imports form the baseline; the number is the growth of RSS over one step after a
warm-up step (gradients, outputs and temporaries included).
"""
import os

import pytest
import torch
import torch.nn.functional as F

import vlood_fast
from vlood_fast.profiling import child_peak_rss, saved_tensor_bytes

SHAPES = [(1000, 1000, 512, 3), (21843, 21843, 512, 3)]
PROVIDERS = ["reference", "torch"] + (["triton"] if torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HERE = os.path.abspath(__file__)


def _inputs(U, C, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    queries = F.normalize(torch.randn(U, D, generator=g), dim=1)
    bank_keys = F.normalize(torch.randn(C, D, generator=g), dim=1)
    bank_values = F.normalize(torch.randn(C, D, generator=g), dim=1)
    weights = torch.randn(U, D, generator=g)
    torch.manual_seed(seed)
    gen = vlood_fast.OgenGenerator(D).to(DEVICE).train()
    tensors = [t.to(DEVICE) for t in (queries, bank_keys, bank_values, weights)]
    for t in tensors[:3]:
        t.requires_grad_()
    return gen, tensors


def make_step(provider, U, C, D=512, k=3):
    """Build inputs and return the zero-argument fwd+bwd step (also used by the child process)."""
    gen, (q, bk, bv, w) = _inputs(U, C, D)

    def step():
        feats, _ = gen.synthesize(q, bk, bv, k, backend=provider)
        (feats * w).sum().backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        # release what the step allocated, so a warm-up step leaves the baseline unchanged
        q.grad = bk.grad = bv.grad = None
        gen.zero_grad(set_to_none=True)

    return step


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "U{}-C{}-D{}-k{}".format(*s))
def test_synthesis_forward_backward(benchmark, shape, provider):
    U, C, D, k = shape
    big = C > 10000
    gen, (q, bk, bv, w) = _inputs(U, C, D)
    peak = child_peak_rss(f"{HERE}:make_step", provider, U, C, D, k)["delta_bytes"] if DEVICE == "cpu" else None
    saved = saved_tensor_bytes(lambda a, b, c: gen.synthesize(a, b, c, k, backend=provider)[0], q, bk, bv)
    step = make_step(provider, U, C, D, k)
    benchmark.group = f"ogen synthesis fwd+bwd U={U} C={C} D={D} k={k}"
    benchmark.extra_info.update(provider=provider, op="ogen_synthesis", mode="forward+backward",
                                shape=list(shape), device=DEVICE, saved_bytes=saved,
                                peak_bytes=peak)
    benchmark.pedantic(step, rounds=3 if big else 30, warmup_rounds=1)
