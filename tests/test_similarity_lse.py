"""energy_score / clip_cross_entropy / similarity_logsumexp: torch and triton paths vs the
fp64 reference, first and second order, every dtype, and the raw kernels' memory safety."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.autograd import gradcheck, gradgradcheck

import vlood_fast
from vlood_fast.kernels import similarity_lse as kernels
from vlood_fast.ops import similarity_lse as ops
from vlood_fast.reference import energy as reference

# (B, K, D): B=1, K=1, odd and non-power-of-two sizes, K spanning several kernel tiles
SHAPES = [(1, 1, 5), (1, 9, 3), (6, 1, 8), (7, 13, 33), (33, 65, 48), (70, 130, 20), (3, 200, 17)]
FAST_BACKENDS = ["torch", "triton"]
HALF = [torch.float16, torch.bfloat16]


def make_inputs(rng, B, K, D, dtype=torch.float32, normalize=True):
    x = torch.randn(B, D, generator=rng, dtype=torch.float64)
    t = torch.randn(K, D, generator=rng, dtype=torch.float64)
    if normalize:
        x, t = F.normalize(x, dim=1), F.normalize(t, dim=1)
    y = torch.randint(0, K, (B,), generator=rng)
    return x.to(dtype), t.to(dtype), y


def rel_err(a, b, floor=1e-30):
    """max |a - b| / max |b|; ``floor`` bounds the denominator where the truth is ~0 (the K=1
    cross-entropy gradient vanishes analytically but its fp32 terms are O(logit_scale))."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(floor)).item()


GRAD_FLOOR = 0.05


OPS = {
    "energy": lambda x, t, y, backend: vlood_fast.energy_score(x, t, 30.0, 0.7, backend=backend),
    "ce_none": lambda x, t, y, backend: vlood_fast.clip_cross_entropy(x, t, y, 30.0, "none", backend=backend),
    "ce_mean": lambda x, t, y, backend: vlood_fast.clip_cross_entropy(x, t, y, 30.0, "mean", backend=backend),
    "ce_sum": lambda x, t, y, backend: vlood_fast.clip_cross_entropy(x, t, y, 30.0, "sum", backend=backend),
    "lse": lambda x, t, y, backend: vlood_fast.similarity_logsumexp(x, t, 12.5, backend=backend),
}


def forward_and_grads(op, x, t, y, backend, cotangent):
    x = x.detach().requires_grad_()
    t = t.detach().requires_grad_()
    out = OPS[op](x, t, y, backend)
    dx, dt = torch.autograd.grad((out.double() * cotangent).sum(), (x, t))
    return out.detach(), dx, dt


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("op", list(OPS))
def test_fp32_matches_fp64_reference(rng, op, shape, backend):
    x, t, y = make_inputs(rng, *shape)
    cot = torch.rand(shape[0] if op in ("energy", "ce_none", "lse") else (), generator=rng,
                     dtype=torch.float64) + 0.5
    ref = forward_and_grads(op, x, t, y, "reference", cot)
    got = forward_and_grads(op, x.float(), t.float(), y, backend, cot)
    # with one class the cross-entropy and its gradients are exactly 0: measure against the
    # size of the cancelling terms (the logit scale) instead
    vanishing = op.startswith("ce") and shape[1] == 1
    assert got[0].dtype == torch.float32
    assert rel_err(got[0], ref[0], 30.0 if vanishing else 1e-30) <= 1e-5
    assert rel_err(got[1], ref[1], 30.0 if vanishing else GRAD_FLOOR) <= 1e-4
    assert rel_err(got[2], ref[2], 30.0 if vanishing else GRAD_FLOOR) <= 1e-4


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", [(7, 13, 33), (33, 130, 48)], ids=str)
@pytest.mark.parametrize("op", ["energy", "ce_mean"])
def test_half_no_worse_than_plain_pytorch(rng, op, shape, dtype, backend):
    x, t, y = make_inputs(rng, *shape)
    cot = torch.rand(shape[0] if op == "energy" else (), generator=rng, dtype=torch.float64) + 0.5
    truth = forward_and_grads(op, x, t, y, "reference", cot)
    plain = forward_and_grads(op, x.to(dtype), t.to(dtype), y, "reference", cot)
    got = forward_and_grads(op, x.to(dtype), t.to(dtype), y, backend, cot)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == dtype
    assert rel_err(got[0], truth[0]) <= rel_err(plain[0], truth[0]) + 1e-3
    for i in (1, 2):
        assert rel_err(got[i], truth[i]) <= rel_err(plain[i], truth[i]) + 1e-2


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 5), (5, 9, 7), (33, 65, 20)], ids=str)
@pytest.mark.parametrize("op", ["energy", "ce_mean", "ce_none"])
def test_second_order_matches_reference(rng, op, shape, backend):
    """An energy-gradient penalty: differentiate |dE/dx|^2 + <dE/dt, w> through the op.

    Second derivatives carry s^2 / T^2 and cancel; fp32 may be as far off as plain fp32
    PyTorch is (measured in the same test), plus 1e-4.
    """
    x0, t0, y = make_inputs(rng, *shape)
    cot = torch.rand(shape[0] if op != "ce_mean" else (), generator=rng, dtype=torch.float64) + 0.5
    wt = torch.randn(shape[1], shape[2], generator=rng, dtype=torch.float64)

    def second_order(dtype, which):
        x = x0.to(dtype).requires_grad_()
        t = t0.to(dtype).requires_grad_()
        out = OPS[op](x, t, y, which)
        dx, dt = torch.autograd.grad((out.double() * cot).sum(), (x, t), create_graph=True)
        penalty = (dx.double() ** 2).sum() + (dt.double() * wt).sum()
        return torch.autograd.grad(penalty, (x, t))

    ref = second_order(torch.float64, "reference")
    plain = second_order(torch.float32, "reference")
    got = second_order(torch.float32, backend)
    for i in (0, 1):
        floor = 30.0 if shape[1] == 1 and op.startswith("ce") else GRAD_FLOOR
        assert rel_err(got[i], ref[i], floor) <= rel_err(plain[i], ref[i], floor) + 1e-4


@pytest.mark.parametrize("chunk", [7, 1 << 20], ids=["multi-chunk", "one-chunk"])
def test_gradcheck_and_gradgradcheck_fp64_torch_path(rng, monkeypatch, chunk):
    monkeypatch.setattr(ops, "CHUNK_ELEMENTS", chunk)
    x, t, y = make_inputs(rng, 4, 6, 5, torch.float64, normalize=False)
    x.requires_grad_()
    t.requires_grad_()
    for op in ("energy", "ce_none", "ce_mean"):
        fn = lambda a, b, op=op: OPS[op](a, b, y, "torch")  # noqa: E731
        assert gradcheck(fn, (x, t))
        assert gradgradcheck(fn, (x, t))


def test_fp64_torch_path_is_exact(rng):
    x, t, y = make_inputs(rng, 9, 11, 6, torch.float64)
    for op in OPS:
        got, ref = OPS[op](x, t, y, "torch"), OPS[op](x, t, y, "reference")
        assert got.dtype == torch.float64
        assert rel_err(got, ref) <= 1e-12


def test_multi_chunk_torch_matches_single_chunk(rng, monkeypatch):
    x, t, y = make_inputs(rng, 17, 123, 24)
    one = forward_and_grads("ce_none", x, t, y, "torch", torch.ones(17, dtype=torch.float64))
    monkeypatch.setattr(ops, "CHUNK_ELEMENTS", 17 * 10)
    many = forward_and_grads("ce_none", x, t, y, "torch", torch.ones(17, dtype=torch.float64))
    for a, b in zip(one, many):
        assert rel_err(b, a) <= 1e-5


def test_gradients_only_where_requested(rng):
    x, t, y = make_inputs(rng, 5, 7, 8)
    for backend in FAST_BACKENDS:
        xr = x.clone().requires_grad_()
        vlood_fast.energy_score(xr, t, backend=backend).sum().backward()
        assert xr.grad is not None and torch.isfinite(xr.grad).all()
        tr = t.clone().requires_grad_()
        vlood_fast.clip_cross_entropy(x, tr, y, backend=backend).backward()
        assert tr.grad is not None and torch.isfinite(tr.grad).all()


def test_no_logits_saved_for_backward_on_large_problems(rng):
    """Beyond the inputs, the recomputing path keeps only per-row statistics."""
    from vlood_fast.profiling import saved_tensor_bytes
    B, K, D = 64, 40000, 8  # B*K above one chunk, so the backward recomputes
    x, t, y = make_inputs(rng, B, K, D)
    x.requires_grad_()
    t.requires_grad_()
    fast = saved_tensor_bytes(lambda a, b: vlood_fast.clip_cross_entropy(a, b, y, backend="torch"), x, t)
    ref = saved_tensor_bytes(lambda a, b: vlood_fast.clip_cross_entropy(a, b, y, backend="reference"), x, t)
    assert fast <= 4 * B + 8 * B  # lse (fp32) + labels (int64)
    assert ref >= 4 * B * K


def test_extreme_logits_stay_finite(rng):
    """Huge scales: the online max keeps exp from overflowing (the reference would too)."""
    x, t, y = make_inputs(rng, 8, 70, 16)
    for backend in FAST_BACKENDS:
        e = vlood_fast.energy_score(x, t, logit_scale=1e4, backend=backend)
        ref = reference.energy_score(x.double(), t.double(), 1e4)
        assert torch.isfinite(e).all()
        assert rel_err(e, ref) <= 1e-5


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 20), K=st.integers(1, 40), D=st.integers(1, 24),
       scale=st.floats(0.1, 50.0), seed=st.integers(0, 2**31 - 1))
def test_property_torch_path_matches_reference(B, K, D, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(B, D, generator=g), torch.randn(K, D, generator=g)
    got = vlood_fast.similarity_logsumexp(x, t, scale, backend="torch")
    ref = torch.logsumexp(scale * x.double() @ t.double().T, 1)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


# ------------------------------------------------------------------ raw kernels, memory safety
SENTINEL = 777.0


def embedded(rng, rows, cols, dtype, fill=float("nan")):
    """A [rows, cols] view with non-unit row stride inside a larger sentinel-filled buffer."""
    buf = torch.full((rows + 5, cols + 9), fill, dtype=dtype)
    view = buf[2:2 + rows, 3:3 + cols]
    view.copy_(torch.randn(rows, cols, generator=rng).to(dtype))
    return buf, view


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 7), (70, 66, 40)], ids=str)
def test_kernels_stay_inside_their_views(rng, shape, dtype):
    B, K, D = shape
    _, x = embedded(rng, B, D, dtype)
    _, t = embedded(rng, K, D, dtype)
    scale = 2.0
    lse_buf = torch.full((B + 10,), SENTINEL)
    lse = kernels.lse_forward(x, t, scale, out=lse_buf[4:4 + B])
    ref = torch.logsumexp(scale * x.double() @ t.double().T, 1)
    assert torch.isfinite(lse).all(), "a NaN sentinel outside the input view was read"
    assert rel_err(lse, ref) <= 1e-5
    assert (lse_buf[:4] == SENTINEL).all() and (lse_buf[4 + B:] == SENTINEL).all()

    g = torch.rand(B, generator=rng) + 0.1
    p = torch.exp(scale * x.double() @ t.double().T - ref[:, None]) * g.double()[:, None]
    for stats_on_rows, a, b, expected in ((True, x, t, scale * p @ t.double()),
                                          (False, t, x, scale * p.T @ x.double())):
        out_buf = torch.full((a.shape[0] + 4, D + 6), SENTINEL)
        out = out_buf[1:1 + a.shape[0], 2:2 + D]
        kernels.lse_weighted_sum(a, b, lse, g, scale, stats_on_rows, out=out, BLOCK_DO=16)
        assert rel_err(out, expected) <= 1e-5
        untouched = torch.ones_like(out_buf, dtype=torch.bool)
        untouched[1:1 + a.shape[0], 2:2 + D] = False
        assert (out_buf[untouched] == SENTINEL).all()


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_retained_graph_backward_twice(rng, backend):
    """A kept probability matrix must not be modified by the first backward."""
    x, t, y = make_inputs(rng, 6, 11, 9)
    x.requires_grad_()
    loss = vlood_fast.clip_cross_entropy(x, t, y, backend=backend)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    assert torch.allclose(x.grad, 2 * first, rtol=1e-6, atol=1e-7)
