"""The fused CRoFT main-step terms (``ops.edr.croft_terms``: CE rows + EDR penalty from one set of
adapted rows, hand-written backward) and ``edr_penalty_adapted`` against the literal
composition: reference cross-entropy + double-backward EDR, fp64, gradients w.r.t. every input
that can carry one (both adapter weights, the rows z and the text features g, directly and
through the adapted rows). Chunked (several K chunks, nothing kept) and single-chunk (S, |e| and
P^T u kept for the backward) paths both run."""
import pytest
import torch
import torch.nn.functional as F

import vlood_fast
from vlood_fast.ops import edr as edr_ops
from vlood_fast.reference.edr import edr_penalty as reference_edr

SHAPES = [(1, 1, 5), (7, 13, 9), (24, 33, 17), (5, 64, 48)]


def _inputs(rng, N, K, D, dtype=torch.float64):
    z = F.normalize(torch.randn(N, D, generator=rng, dtype=dtype), dim=1).requires_grad_()
    g = F.normalize(torch.randn(K, D, generator=rng, dtype=dtype), dim=1).requires_grad_()
    wi = (torch.eye(D, dtype=dtype) + 0.3 * torch.randn(D, D, generator=rng, dtype=dtype)).requires_grad_()
    wt = (torch.eye(D, dtype=dtype) + 0.3 * torch.randn(D, D, generator=rng, dtype=dtype)).requires_grad_()
    y = torch.randint(0, K, (N,), generator=rng)
    return z, g, wi, wt, y


def _literal(z, g, wi, wt, y, s, r, rt, temp, preset):
    u = F.normalize(r * z @ wi.t() + (1 - r) * z, dim=1)
    v = F.normalize(rt * g @ wt.t() + (1 - rt) * g, dim=1)
    ce = F.cross_entropy(s * u @ v.t(), y, reduction="none")
    return ce, reference_edr(z, g, wi, wt, r, rt, temp, **edr_ops.PRESETS[preset])


def _fused(z, g, wi, wt, y, s, r, rt, temp, preset, backend="torch"):
    a, e = edr_ops.adapter_map(z, wi, r), edr_ops.adapter_map(g, wt, rt)
    return edr_ops.croft_terms(a, e, z, g, y, s, r, rt, temp, **edr_ops.PRESETS[preset], backend=backend)


def _value_and_grads(fn, inputs, rng):
    ce, R = fn()
    w = torch.rand(ce.shape[0], generator=rng, dtype=ce.dtype) + 0.5  # every CE row weighs differently
    loss = (w * ce).sum() + 3.0 * R
    return (ce.detach(), R.detach()), torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("preset", ["setup1", "setup2"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_croft_terms_match_the_literal_composition_fp64(rng, monkeypatch, shape, preset, chunked):
    if chunked:  # 5 columns per chunk at most: several chunks, no kept state
        monkeypatch.setattr(edr_ops, "CHUNK_ELEMENTS", 5 * shape[0])
    z, g, wi, wt, y = _inputs(rng, *shape)
    args = (z, g, wi, wt, y, 30.0, 0.3, 0.6, 0.7, preset)
    torch.manual_seed(0)
    (ce, R), grads = _value_and_grads(lambda: _fused(*args), (z, g, wi, wt), torch.Generator().manual_seed(5))
    (ce0, R0), grads0 = _value_and_grads(lambda: _literal(*args), (z, g, wi, wt),
                                         torch.Generator().manual_seed(5))
    torch.testing.assert_close(ce, ce0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(R, R0, rtol=1e-10, atol=1e-14)
    for name, a, b in zip(("z", "g", "wi", "wt"), grads, grads0):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=f"grad {name}")


@pytest.mark.parametrize("need", [(True, False, True, False), (False, False, True, True), (True, True, False, False)],
                         ids=["z+wi", "wi+wt (CRoFT)", "z+g"])
def test_croft_terms_gradients_only_where_needed(rng, need):
    z, g, wi, wt, y = _inputs(rng, 9, 11, 7)
    leaves = [t.detach().requires_grad_(n) for t, n in zip((z, g, wi, wt), need)]
    args = (*leaves, y, 100.0, 0.2, 0.5, 1.0, "setup1")
    ce, R = _fused(*args)
    ce0, R0 = _literal(*args)
    wanted = [t for t in leaves if t.requires_grad]
    got = torch.autograd.grad(ce.sum() + R, wanted)
    expected = torch.autograd.grad(ce0.sum() + R0, wanted)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_edr_penalty_adapted_matches_edr_penalty(rng, backend):
    z, g, wi, wt, _ = _inputs(rng, 6, 10, 12, dtype=torch.float32)
    a, e = edr_ops.adapter_map(z, wi, 0.2), edr_ops.adapter_map(g, wt, 0.5)
    R = edr_ops.edr_penalty_adapted(a, e, z, g, 0.2, 0.5, 0.8, backend=backend)
    R0 = reference_edr(z.double(), g.double(), wi.double(), wt.double(), 0.2, 0.5, 0.8)
    grads = torch.autograd.grad(R, (z, g, wi, wt))
    grads0 = torch.autograd.grad(R0, (z, g, wi, wt))
    torch.testing.assert_close(R.double(), R0, rtol=1e-5, atol=1e-9)
    for a_, b in zip(grads, grads0):
        assert ((a_.double() - b).abs().max() / b.abs().max()) < 1e-4
    with pytest.raises(ValueError, match="no reference backend"):
        edr_ops.edr_penalty_adapted(a, e, z, g, backend="reference")
    with pytest.raises(ValueError, match="must match"):
        edr_ops.edr_penalty_adapted(a[:3], e, z, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_croft_terms_low_precision_inputs(rng, dtype):
    """fp32 accumulation whatever the input dtype: within DESIGN's bounds of the fp64 truth."""
    z, g, wi, wt, y = _inputs(rng, 16, 40, 24)
    args = (z, g, wi, wt, y, 100.0, 0.2, 0.5, 1.0, "setup1")
    ce0, R0 = _literal(*args)
    low = [t.detach().to(dtype).requires_grad_() for t in (z, g, wi, wt)]
    ce, R = _fused(*low, *args[4:])
    assert ce.dtype == dtype and R.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    assert ((ce.double() - ce0).abs().max() / ce0.abs().max()) < tol
    assert abs(R.double() - R0) / R0 < tol
    grads = torch.autograd.grad(ce.float().sum() + R.float(), low)
    grads0 = torch.autograd.grad(ce0.sum() + R0, (z, g, wi, wt))
    gtol = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 2e-1}[dtype]
    for a, b in zip(grads, grads0):
        assert torch.isfinite(a).all()
        assert ((a.double() - b).abs().max() / b.abs().max()) < gtol


@pytest.mark.parametrize("wccf", [True, False])
@pytest.mark.parametrize("preset", ["setup1", "setup2"])
def test_croft_loss_main_fused_equals_reference_backend(rng, monkeypatch, preset, wccf):
    """CroftLoss.main on the fused torch path vs the same loss built from the reference ops."""
    D = 12
    x = F.normalize(torch.randn(10, D, generator=rng, dtype=torch.float64), dim=1)
    t = F.normalize(torch.randn(7, D, generator=rng, dtype=torch.float64), dim=1)
    y = torch.randint(0, 7, (10,), generator=rng)
    adapter = vlood_fast.CroftAdapter(D, ratio=0.3, ratio_text=0.6).double()
    gen = vlood_fast.ShiftGenerator(D).double() if wccf else None
    with torch.no_grad():
        for p in [*adapter.parameters(), *(gen.parameters() if gen else [])]:
            p.add_(0.2 * torch.randn(D, D, generator=rng, dtype=torch.float64))
    crit = vlood_fast.CroftLoss(adapter, gen, preset=preset, lambda1=0.7, lambda2=3.0)
    params = list(adapter.parameters())

    def run(backend):
        monkeypatch.setenv("VLOOD_FAST_BACKEND", backend)
        total, parts = crit.main(x, y, t)
        return total.detach(), {k: v.detach() for k, v in parts.items()}, torch.autograd.grad(total, params)

    total, parts, grads = run("torch")
    total0, parts0, grads0 = run("reference")
    torch.testing.assert_close(total, total0, rtol=1e-10, atol=1e-12)
    assert parts.keys() == parts0.keys()
    for k in parts:
        torch.testing.assert_close(parts[k], parts0[k], rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, grads0):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_croft_loss_step_equals_separate_steps(rng):
    """``step`` (shared adapted rows) == generator_step + main run separately, same updates."""
    D = 16
    x = F.normalize(torch.randn(12, D, generator=rng), dim=1)
    t = F.normalize(torch.randn(9, D, generator=rng), dim=1)
    y = torch.randint(0, 9, (12,), generator=rng)

    def make():
        torch.manual_seed(3)
        adapter, gen = vlood_fast.CroftAdapter(D), vlood_fast.ShiftGenerator(D)
        with torch.no_grad():
            adapter.image_weight.add_(0.1 * torch.randn(D, D))
        return (adapter, gen, vlood_fast.CroftLoss(adapter, gen),
                torch.optim.SGD(adapter.parameters(), lr=0.05, momentum=0.9),
                torch.optim.SGD(gen.parameters(), lr=0.05, momentum=0.9))

    a1, g1, c1, o1, og1 = make()
    a2, g2, c2, o2, og2 = make()
    for _ in range(3):
        logs = c1.step(x, y, t, o1, og1, gen_steps=2)
        for _ in range(2):
            loss, _ = c2.generator_step(x, y, t)
            og2.zero_grad()
            loss.backward()
            og2.step()
        loss, parts = c2.main(x, y, t)
        o2.zero_grad()
        loss.backward()
        o2.step()
        torch.testing.assert_close(logs["total"], parts["total"].detach(), rtol=1e-5, atol=1e-6)
    for p, q in zip([*a1.parameters(), *g1.parameters()], [*a2.parameters(), *g2.parameters()]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert {"gen_shift_ce", "gen_align", "ce", "shift_ce", "align", "edr", "total"} <= set(logs)
    with pytest.raises(ValueError, match="generator_optimizer is required"):
        c1.step(x, y, t, o1)


def test_fused_path_rejects_overflowing_temperatures_and_bad_reductions(rng):
    """The fused path validates like edr_penalty: 1/T > 40 would overflow exp(u.v / T) in fp32."""
    z, g, wi, wt, y = _inputs(rng, 6, 5, 8, dtype=torch.float32)
    a, e = edr_ops.adapter_map(z, wi, 0.2), edr_ops.adapter_map(g, wt, 0.5)
    with pytest.raises(ValueError, match=r"1/temperature must be <= 40"):
        edr_ops.croft_terms(a, e, z, g, y, temperature=0.01)
    with pytest.raises(ValueError, match="potential"):
        edr_ops.croft_terms(a, e, z, g, y, potential="max")
    crit = vlood_fast.CroftLoss(vlood_fast.CroftAdapter(8), vlood_fast.ShiftGenerator(8), temperature=0.01)
    with pytest.raises(ValueError, match=r"1/temperature must be <= 40"):
        crit.main(z.detach(), y, g.detach())
