"""Fused similarity + logsumexp: energy score and CLIP cross-entropy.

    .venv/bin/python -m pytest benchmarks/bench_similarity_lse.py

Providers side by side in one process: 'reference' (materialized B x K logits, plain
autograd), 'compiled' (torch.compile of the reference; forward+backward only), 'torch' (the
chunked path) and, on CUDA, 'triton'. Modes: forward, backward, forward+backward.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import vlood_fast
from vlood_fast.profiling import child_peak_rss, saved_tensor_bytes
from vlood_fast.reference import energy as reference

from common import DEVICE, MODES, compiled, providers, record, run_modes

SHAPES = [(256, 1000, 512), (4096, 21843, 512)]


def _inputs(B, K, D):
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(B, D, generator=g), dim=1).to(DEVICE).requires_grad_()
    t = F.normalize(torch.randn(K, D, generator=g), dim=1).to(DEVICE).requires_grad_()
    y = torch.randint(0, K, (B,), generator=g).to(DEVICE)
    return x, t, y


def _energy_ref(x, t):
    return reference.energy_score(x, t).sum()


def _ce_ref(x, t, y):
    return reference.clip_cross_entropy(x, t, y)


def _loss(op, provider, shape):
    """A callable (x, t, y) -> scalar for this op and provider."""
    if op == "energy":
        if provider == "compiled":
            fn = compiled(_energy_ref, ("energy", shape))
            return lambda x, t, y: fn(x, t)
        return lambda x, t, y: vlood_fast.energy_score(x, t, backend=provider).sum()
    if provider == "compiled":
        return compiled(_ce_ref, ("ce", shape))
    return lambda x, t, y: vlood_fast.clip_cross_entropy(x, t, y, backend=provider)


def make_step(op, provider, B, K, D):
    """Inputs and a zero-argument fwd+bwd step: what a child process runs for peak memory."""
    x, t, y = _inputs(B, K, D)
    loss = _loss(op, provider, (B, K, D))

    def step():
        loss(x, t, y).backward()
        x.grad = t.grad = None
    return step


def _peak_bytes(op, provider, shape):
    """Peak RSS growth of one fwd+bwd step in a fresh process (CPU), or CUDA allocator stats."""
    if DEVICE == "cuda":
        step = make_step(op, provider, *shape)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return child_peak_rss(os.path.abspath(__file__) + ":make_step", op, provider, *shape)["delta_bytes"]


CASES = [(op, shape, provider, mode)
         for op in ("energy", "cross_entropy")
         for shape in SHAPES
         for provider in providers()
         for mode in MODES
         # the compiled reference is timed as a training step only (compile cost excluded)
         if not (provider == "compiled" and mode != "forward+backward")]


@pytest.mark.parametrize("op,shape,provider,mode", CASES,
                         ids=["{}-B{}-K{}-D{}-{}-{}".format(o, *s, p, m) for o, s, p, m in CASES])
def test_similarity_lse(benchmark, op, shape, provider, mode):
    x, t, y = _inputs(*shape)
    loss = _loss(op, provider, shape)
    big = shape[1] > 10000
    saved = saved_tensor_bytes(lambda a, b: loss(a, b, y), x, t) if provider != "compiled" else None
    peak = _peak_bytes(op, provider, shape) if mode == "forward+backward" else None
    record(benchmark, group=f"{op} {mode} B={shape[0]} K={shape[1]} D={shape[2]}",
           provider=provider, mode=mode, op=op, shape=shape, saved_bytes=saved, peak_bytes=peak)
    if provider == "compiled":  # compile outside the timed region
        loss(x, t, y).backward()
    run_modes(benchmark, mode, lambda: loss(x, t, y), (x, t), rounds=3 if big else 20)
