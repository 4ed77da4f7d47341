"""edr_penalty: the closed form (torch and triton) against the literal double-backward
reference, first-order gradients w.r.t. every input, every dtype, both presets, bad inputs,
degenerate rows and the kernel's memory safety."""
import pytest
import torch
from torch.autograd import gradcheck

import vlood_fast
from vlood_fast.kernels import edr as kernels
from vlood_fast.ops import edr as ops
from vlood_fast.profiling import saved_tensor_bytes

SHAPES = [(1, 1, 4), (1, 9, 6), (7, 1, 5), (13, 37, 33), (64, 70, 24)]  # (N, K, D)
PRESETS = ["setup1", "setup2"]


def make_inputs(rng, N, K, D, dtype=torch.float64):
    z = torch.nn.functional.normalize(torch.randn(N, D, generator=rng, dtype=torch.float64), dim=1)
    g = torch.nn.functional.normalize(torch.randn(K, D, generator=rng, dtype=torch.float64), dim=1)
    eye = torch.eye(D, dtype=torch.float64)
    wi = eye + 0.3 * torch.randn(D, D, generator=rng, dtype=torch.float64)   # non-identity
    wt = eye + 0.3 * torch.randn(D, D, generator=rng, dtype=torch.float64)
    return [t.to(dtype) for t in (z, g, wi, wt)]


def penalty_and_grads(inputs, backend, preset="setup1", temperature=0.7):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    R = vlood_fast.edr_penalty(*leaves, ratio=0.3, ratio_text=0.6, temperature=temperature,
                               backend=backend, **ops.PRESETS[preset])
    return (R.detach(), *torch.autograd.grad(R, leaves))


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_path_fp64_equals_double_backward(rng, shape, preset, monkeypatch):
    inputs = make_inputs(rng, *shape)
    ref = penalty_and_grads(inputs, "reference", preset)
    # one chunk keeping v for the backward, one chunk recomputing it, several chunks
    for chunk, keep in ((1 << 20, 1 << 20), (1 << 20, 0), (5, 1 << 20)):
        monkeypatch.setattr(ops, "CHUNK_ELEMENTS", chunk)
        monkeypatch.setattr(ops, "KEEP_TEXT_ELEMENTS", keep)
        got = penalty_and_grads(inputs, "torch", preset)
        for a, b in zip(got, ref):
            assert rel_err(a, b) <= 1e-10


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_matches_fp64_reference(rng, shape, preset, backend):
    inputs = make_inputs(rng, *shape)
    ref = penalty_and_grads(inputs, "reference", preset)
    got = penalty_and_grads([t.float() for t in inputs], backend, preset)
    assert got[0].dtype == torch.float32
    assert rel_err(got[0], ref[0]) <= 1e-5
    for a, b in zip(got[1:], ref[1:]):
        assert a.dtype == torch.float32
        assert rel_err(a, b) <= 1e-4


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_no_worse_than_plain_pytorch(rng, dtype, backend):
    inputs = make_inputs(rng, 9, 21, 16)
    truth = penalty_and_grads(inputs, "reference")
    # plain PyTorch in half precision: the reference's double backward on half inputs
    plain = penalty_and_grads([t.to(dtype) for t in inputs], "reference")
    got = penalty_and_grads([t.to(dtype) for t in inputs], backend)
    assert got[0].dtype == dtype
    assert rel_err(got[0], truth[0]) <= rel_err(plain[0], truth[0]) + 1e-3
    for a, p, t in zip(got[1:], plain[1:], truth[1:]):
        assert rel_err(a, t) <= rel_err(p, t) + 1e-2


def test_gradcheck_torch_path(rng):
    inputs = [t.requires_grad_() for t in make_inputs(rng, 4, 6, 5)]
    for preset in PRESETS:
        assert gradcheck(lambda *a: vlood_fast.edr_penalty(*a, temperature=0.8, backend="torch",
                                                           **ops.PRESETS[preset]), inputs)


def test_gradients_flow_only_where_requested(rng):
    z, g, wi, wt = make_inputs(rng, 5, 7, 6, torch.float32)
    wi.requires_grad_()
    vlood_fast.edr_penalty(z, g, wi, wt).backward()
    assert wi.grad is not None and torch.isfinite(wi.grad).all() and wi.grad.abs().sum() > 0
    assert z.grad is None and g.grad is None and wt.grad is None


def test_identity_weights_and_default_arguments(rng):
    z, g, _, _ = make_inputs(rng, 6, 5, 8, torch.float32)
    eye = torch.eye(8)
    got = vlood_fast.edr_penalty(z, g, eye, eye)
    ref = vlood_fast.edr_penalty(z.double(), g.double(), eye.double(), eye.double(), backend="reference")
    assert rel_err(got, ref) <= 1e-5


def test_zero_rows_stay_finite(rng):
    z, g, wi, wt = make_inputs(rng, 6, 5, 8, torch.float32)
    z[2] = 0.0
    g[1] = 0.0
    leaves = [t.requires_grad_() for t in (z, g, wi, wt)]
    for backend in ("torch", "triton"):
        R = vlood_fast.edr_penalty(*leaves, backend=backend)
        grads = torch.autograd.grad(R, leaves)
        assert torch.isfinite(R) and all(torch.isfinite(x).all() for x in grads)


def test_saves_only_small_state_for_backward(rng, monkeypatch):
    N, K, D = 16, 300, 32
    inputs = [t.float().requires_grad_() for t in make_inputs(rng, N, K, D)]
    ref = saved_tensor_bytes(lambda *a: vlood_fast.edr_penalty(*a, backend="reference"), *inputs)
    assert ref >= 4 * N * K             # the reference keeps N x K tensors
    kept = saved_tensor_bytes(lambda *a: vlood_fast.edr_penalty(*a, backend="torch"), *inputs)
    # G, sum_k P v, the adapted rows u and |a|, and the small text state
    assert kept <= 4 * (D * D + 2 * N * D + N + K * D + K)
    monkeypatch.setattr(ops, "KEEP_TEXT_ELEMENTS", 0)  # large vocabularies: recompute v
    lean = saved_tensor_bytes(lambda *a: vlood_fast.edr_penalty(*a, backend="torch"), *inputs)
    assert lean <= 4 * (D * D + 2 * N * D + N)  # G, sum_k P v, u and |a| only


def test_bad_inputs(rng):
    z, g, wi, wt = make_inputs(rng, 4, 5, 6, torch.float32)
    with pytest.raises(ValueError, match=r"1/temperature must be <= 40"):
        vlood_fast.edr_penalty(z, g, wi, wt, temperature=0.02)
    with pytest.raises(ValueError, match=r"image_weight must have shape \[6, 6\]"):
        vlood_fast.edr_penalty(z, g, wi[:5, :5], wt)
    with pytest.raises(ValueError, match=r"z has feature dim 6 but text_features has 4"):
        vlood_fast.edr_penalty(z, g[:, :4], wi, wt)
    with pytest.raises(TypeError, match="text_weight has dtype torch.float64"):
        vlood_fast.edr_penalty(z, g, wi, wt.double())
    with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\]"):
        vlood_fast.edr_penalty(z, g, wi, wt, ratio=1.5)
    with pytest.raises(ValueError, match="potential must be one of"):
        vlood_fast.edr_penalty(z, g, wi, wt, potential="max")
    with pytest.raises(ValueError, match="penalty must be one of"):
        vlood_fast.edr_penalty(z, g, wi, wt, penalty="l1")
    with pytest.raises(ValueError, match=r"z must have shape \[N, D\]"):
        vlood_fast.edr_penalty(z[0], g, wi, wt)
    with pytest.raises(ValueError, match="z must be non-empty"):
        vlood_fast.edr_penalty(z[:0], g, wi, wt)
    with pytest.raises(ValueError, match="text_weight is on meta"):
        vlood_fast.edr_penalty(z, g, wi, wt.to("meta"))


def test_kernel_stays_inside_its_views(rng):
    NI, NJ, D = 37, 70, 40
    sentinel = 777.0

    def embedded(rows):
        buf = torch.full((rows + 4, D + 7), float("nan"))
        view = buf[2:2 + rows, 3:3 + D]
        view.copy_(torch.nn.functional.normalize(torch.randn(rows, D, generator=rng), dim=1))
        return view

    x, xd, y, yd = embedded(NI), embedded(NI), embedded(NJ), embedded(NJ)
    out_buf = torch.full((3, NI + 3, D + 5), sentinel)
    outs = tuple(out_buf[i, 1:1 + NI, 2:2 + D] for i in range(3))
    q, pd, p = kernels.edr_pass(x, y, 2.0, own_dot=xd, other_dot=yd, cphi=0.5, out=outs,
                                BLOCK_DO=16)
    P = torch.exp(2.0 * x.double() @ y.double().T)
    M = 2.0 * (xd.double() @ y.double().T + x.double() @ yd.double().T)
    assert rel_err(p, P @ y.double()) <= 1e-5
    assert rel_err(pd, P @ yd.double()) <= 1e-5
    assert rel_err(q, (0.5 * P * M) @ y.double()) <= 1e-5
    inside = torch.zeros_like(out_buf, dtype=torch.bool)
    inside[:, 1:1 + NI, 2:2 + D] = True
    assert (out_buf[~inside] == sentinel).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("wanted", [(0,), (1,), (2,), (3,), (0, 2, 3), (1, 3)])
def test_any_subset_of_gradients_matches_the_full_backward(rng, backend, wanted):
    inputs = make_inputs(rng, 6, 9, 8, torch.float32)
    full = penalty_and_grads(inputs, backend)[1:]
    leaves = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
    R = vlood_fast.edr_penalty(*leaves, ratio=0.3, ratio_text=0.6, temperature=0.7, backend=backend)
    grads = torch.autograd.grad(R, [leaves[i] for i in wanted])
    for i, grad in zip(wanted, grads):
        assert torch.allclose(grad, full[i], rtol=1e-5, atol=1e-7)
