"""EDR penalty (CRoFT), forward + backward: closed form vs the literal double backward.

    .venv/bin/python -m pytest benchmarks/bench_edr.py

Two gradient configurations: "croft" (z and both weights require grad, the text features are
frozen, as in CRoFT's training) and "all" (every input requires grad). Providers side by side: 'reference' (autograd.grad(create_graph=True) then backward, as the
paper's code), 'compiled' (torch.compile of the reference, where it compiles), 'torch' (the
chunked closed form), 'triton' on CUDA, and 'gemm_floor': the products the closed form cannot
avoid, back to back (DESIGN.md's count: 10 of [N, D] x [D, K], 4 of [K, D] x [D, D], 6 of
[N, D] x [D, D]). Shapes: (64, 400, 512) is the paper's Setup-I batch with WCCF (B = 32 real +
32 shifted rows); (256, 21843, 512) an ImageNet-21k vocabulary.
"""
import pytest
import torch
import torch.nn.functional as F

import vlood_fast
from vlood_fast.profiling import saved_tensor_bytes
from vlood_fast.reference.edr import edr_penalty as reference_edr

from common import DEVICE, compiled, providers, record, run_modes

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


@pytest.mark.parametrize("grads", list(GRADS))
@pytest.mark.parametrize("provider", providers() + ["gemm_floor"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-K{}-D{}".format(*s))
def test_edr_forward_backward(benchmark, shape, provider, grads):
    big = shape[1] > 10000
    rounds = 3 if big else 15
    group = "edr forward+backward N={} K={} D={} grads={}".format(*shape, grads)
    if provider == "gemm_floor":
        record(benchmark, group=group, provider=provider, mode="forward+backward",
               op=f"edr ({grads} grads)", shape=shape)
        benchmark.pedantic(gemm_floor(*shape), rounds=rounds, warmup_rounds=1)
        return
    inputs = _inputs(*shape, grads)
    if provider == "compiled":
        fn = compiled(reference_edr, ("edr", shape))
        penalty = lambda *a: fn(*a)  # noqa: E731
        penalty(*inputs).backward()  # compile outside the timed region
        saved = None
    else:
        penalty = lambda *a: vlood_fast.edr_penalty(*a, backend=provider)  # noqa: E731
        saved = saved_tensor_bytes(penalty, *inputs)
    record(benchmark, group=group, provider=provider, mode="forward+backward",
           op=f"edr ({grads} grads)", shape=shape, saved_bytes=saved)
    run_modes(benchmark, "forward+backward", lambda: penalty(*inputs), inputs, rounds=rounds)
