"""EDR penalty (CRoFT), forward + backward: closed form vs the literal double backward.

    .venv/bin/python -m pytest benchmarks/bench_edr.py

Two gradient configurations: "croft" (z and both weights require grad, the text features are
frozen, as in CRoFT's training) and "all" (every input requires grad). Providers side by side: 'reference' (autograd.grad(create_graph=True) then backward, as the
paper's code), 'torch' (the chunked closed form), 'triton' on CUDA, and 'gemm_floor': the products the closed form cannot
avoid, back to back (DESIGN.md's count: 10 of [N, D] x [D, K], 4 of [K, D] x [D, D], 6 of
[N, D] x [D, D]). Shapes: (64, 400, 512) is the paper's Setup-I batch with WCCF (B = 32 real +
32 shifted rows); (256, 21843, 512) an ImageNet-21k vocabulary. The compiled reference is
absent: torch.compile refuses the double backward (checked by the last test).
"""
import os

import pytest
import torch
import torch.nn.functional as F

import vlood_fast
from vlood_fast.profiling import child_peak_rss, saved_tensor_bytes

from common import DEVICE, MODES, providers, record, run_modes

SHAPES = [(64, 400, 512), (256, 21843, 512)]


GRADS = {
    # CRoFT's own use: z = [F; C] (C depends on the adapter) and both weights train; the
    # text features are frozen CLIP outputs
    "croft": (True, False, True, True),
    "all": (True, True, True, True),
}


def _inputs(N, K, D, grads="croft"):
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(N, D, generator=g), dim=1)
    t = F.normalize(torch.randn(K, D, generator=g), dim=1)
    eye = torch.eye(D)
    wi = eye + 0.02 * torch.randn(D, D, generator=g)
    wt = eye + 0.02 * torch.randn(D, D, generator=g)
    return [x.to(DEVICE).requires_grad_(need) for x, need in zip((z, t, wi, wt), GRADS[grads])]


def gemm_floor(N, K, D):
    """The unavoidable products back to back, on fresh operands of the right shapes."""
    g = torch.Generator().manual_seed(1)
    nd = torch.randn(N, D, generator=g).to(DEVICE)
    kd = torch.randn(K, D, generator=g).to(DEVICE)
    dd = torch.randn(D, D, generator=g).to(DEVICE)

    def run():
        for _ in range(10):
            torch.mm(nd, kd.t())
        for _ in range(4):
            torch.mm(kd, dd)
        for _ in range(6):
            torch.mm(nd, dd)
    return run


def make_step(provider, N, K, D, grads):
    """Inputs and a zero-argument fwd+bwd step: what a child process runs for peak memory."""
    inputs = _inputs(N, K, D, grads)

    def step():
        vlood_fast.edr_penalty(*inputs, backend=provider).backward()
        for x in inputs:
            x.grad = None
    return step


CASES = [(shape, grads, provider, mode)
         for shape in SHAPES for grads in GRADS
         for provider in [p for p in providers() if p != "compiled"] + ["gemm_floor"]
         for mode in MODES
         if provider != "gemm_floor" or mode == "forward+backward"]


@pytest.mark.parametrize("shape,grads,provider,mode", CASES,
                         ids=["N{}-K{}-D{}-{}-{}-{}".format(*s, g, p, m) for s, g, p, m in CASES])
def test_edr(benchmark, shape, grads, provider, mode):
    big = shape[1] > 10000
    rounds = 3 if big else 15
    group = "edr {} N={} K={} D={} grads={}".format(mode, *shape, grads)
    op = f"edr ({grads} grads)"
    if provider == "gemm_floor":
        record(benchmark, group=group, provider=provider, mode=mode, op=op, shape=shape)
        benchmark.pedantic(gemm_floor(*shape), rounds=rounds, warmup_rounds=1)
        return
    inputs = _inputs(*shape, grads)
    penalty = lambda *a: vlood_fast.edr_penalty(*a, backend=provider)  # noqa: E731
    peak = None
    if mode == "forward+backward" and DEVICE == "cpu":
        peak = child_peak_rss(os.path.abspath(__file__) + ":make_step", provider, *shape, grads)["delta_bytes"]
    record(benchmark, group=group, provider=provider, mode=mode, op=op, shape=shape,
           saved_bytes=saved_tensor_bytes(penalty, *inputs), peak_bytes=peak)
    run_modes(benchmark, mode, lambda: penalty(*inputs), [x for x in inputs if x.requires_grad],
              rounds=rounds)


def test_compiled_reference_is_not_possible():
    """torch.compile cannot trace the reference: AOT autograd has no double backward."""
    from vlood_fast.reference.edr import edr_penalty as reference_edr
    z, g, wi, wt = _inputs(8, 10, 16, "croft")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.compile(reference_edr)(z, g, wi, wt).backward()
