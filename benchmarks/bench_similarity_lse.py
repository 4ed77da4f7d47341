"""Fused similarity + logsumexp: energy score and CLIP cross-entropy, forward + backward.

    pytest benchmarks/bench_similarity_lse.py

Providers run side by side in one process: 'reference' (materialized B x K logits, plain
autograd) and 'torch' (the chunked path; on CUDA add 'triton').
"""
import pytest
import torch
import torch.nn.functional as F

import vlood_fast
from vlood_fast.profiling import saved_tensor_bytes

SHAPES = [(256, 1000, 512), (4096, 21843, 512)]
PROVIDERS = ["reference", "torch"] + (["triton"] if torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, K, D):
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(B, D, generator=g), dim=1).to(DEVICE).requires_grad_()
    t = F.normalize(torch.randn(K, D, generator=g), dim=1).to(DEVICE).requires_grad_()
    y = torch.randint(0, K, (B,), generator=g).to(DEVICE)
    return x, t, y


OPS = {
    "energy": lambda x, t, y, p: vlood_fast.energy_score(x, t, backend=p).sum(),
    "cross_entropy": lambda x, t, y, p: vlood_fast.clip_cross_entropy(x, t, y, backend=p),
}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-K{}-D{}".format(*s))
@pytest.mark.parametrize("op", list(OPS))
def test_forward_backward(benchmark, op, shape, provider):
    x, t, y = _inputs(*shape)
    fn = OPS[op]

    def step():
        x.grad = t.grad = None
        fn(x, t, y, provider).backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    big = shape[1] > 10000
    benchmark.group = f"{op} fwd+bwd B={shape[0]} K={shape[1]} D={shape[2]}"
    benchmark.extra_info.update(
        provider=provider, op=op, mode="forward+backward", shape=list(shape), device=DEVICE,
        saved_bytes=saved_tensor_bytes(lambda a, b: fn(a, b, y, provider), x, t))
    benchmark.pedantic(step, rounds=3 if big else 20, warmup_rounds=1)
