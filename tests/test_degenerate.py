"""Degenerate and hostile inputs: zero rows, duplicates, one class, one label, fp16 at logit
scale 100, empty batches, and the opt-in finite check (VLOOD_FAST_CHECK_FINITE=1)."""
import math

import pytest
import torch
import torch.nn.functional as F

import vlood_fast
from vlood_fast.croft import label_alignment

FAST = ["torch", "triton"]


def unit(rng, n, d, dtype=torch.float32):
    return F.normalize(torch.randn(n, d, generator=rng), dim=1).to(dtype)


@pytest.mark.parametrize("backend", FAST)
def test_zero_feature_rows_give_finite_values_and_gradients(rng, backend):
    """Zero rows have all logits 0: energy = -T log K exactly, CE = log K, finite gradients."""
    x, t = unit(rng, 5, 16), unit(rng, 7, 16)
    x[1] = 0.0
    x.requires_grad_()
    e = vlood_fast.energy_score(x, t, temperature=0.5, backend=backend)
    assert torch.isclose(e[1], torch.tensor(-0.5 * math.log(7)), atol=1e-6)
    ce = vlood_fast.clip_cross_entropy(x, t, torch.tensor([0, 1, 2, 3, 4]), reduction="none", backend=backend)
    assert torch.isclose(ce[1], torch.tensor(math.log(7)), atol=1e-5)
    (e.sum() + ce.sum()).backward()
    assert torch.isfinite(x.grad).all()
    # adapters and the shift generator normalize with F.normalize's epsilon: zero stays zero
    adapter, gen = vlood_fast.CroftAdapter(16), vlood_fast.ShiftGenerator(16)
    assert torch.equal(adapter.image(x.detach())[1], torch.zeros(16))
    assert torch.isfinite(gen(adapter.image(x.detach()))).all()
    assert torch.isfinite(vlood_fast.croft_ood_score(adapter, x.detach(), t)).all()


@pytest.mark.parametrize("backend", FAST)
def test_duplicate_rows_match_the_reference(rng, backend):
    x, t = unit(rng, 4, 12), unit(rng, 3, 12)
    t = torch.cat([t, t[:1], t[:1]])          # a class repeated three times
    x = torch.cat([x, x[:1]])                 # and a repeated image
    y = torch.tensor([0, 3, 4, 1, 0])
    for fn in (lambda a, b, be: vlood_fast.energy_score(a, b, backend=be),
               lambda a, b, be: vlood_fast.clip_cross_entropy(a, b, y, reduction="none", backend=be)):
        got, ref = fn(x, t, backend), fn(x.double(), t.double(), "reference")
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5)
    z = torch.cat([x, x])
    eye = torch.eye(12)
    got = vlood_fast.edr_penalty(z, t, eye, eye, backend=backend)
    ref = vlood_fast.edr_penalty(z.double(), t.double(), eye.double(), eye.double(), backend="reference")
    assert torch.allclose(got.double(), ref, rtol=1e-5)


def test_one_class_and_one_label():
    g = torch.Generator().manual_seed(0)
    x, t = unit(g, 6, 8), unit(g, 1, 8)
    y = torch.zeros(6, dtype=torch.long)
    assert torch.allclose(vlood_fast.clip_cross_entropy(x, t, y), torch.tensor(0.0), atol=1e-5)
    # all labels equal: alignment is the mean of every pair's similarity
    c = unit(g, 6, 8)
    assert torch.allclose(label_alignment(c, x, y), (c @ x.T).mean(), atol=1e-6)
    loss, parts = vlood_fast.CroftLoss(vlood_fast.CroftAdapter(8), vlood_fast.ShiftGenerator(8)).main(x, y, t)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())


@pytest.mark.parametrize("backend", FAST)
def test_fp16_at_logit_scale_100_does_not_overflow(rng, backend):
    """exp(100) overflows fp16 (max 65504); the kernels accumulate in fp32 with an online max."""
    x, t = unit(rng, 9, 32, torch.float16), unit(rng, 50, 32, torch.float16)
    x[0] = t[3]  # a logit of exactly 100
    x.requires_grad_()
    e = vlood_fast.energy_score(x, t, logit_scale=100.0, backend=backend)
    ce = vlood_fast.clip_cross_entropy(x, t, torch.arange(9), logit_scale=100.0, backend=backend)
    (e.float().sum() + ce.float()).backward()
    assert torch.isfinite(e).all() and torch.isfinite(ce) and torch.isfinite(x.grad).all()
    ref = vlood_fast.energy_score(x.detach().double(), t.double(), 100.0, backend="reference")
    assert torch.allclose(e.double(), ref, rtol=2e-3)


def test_empty_inputs_are_rejected(rng):
    x, t = unit(rng, 3, 8), unit(rng, 4, 8)
    eye = torch.eye(8)
    cases = [
        lambda: vlood_fast.energy_score(x[:0], t),
        lambda: vlood_fast.clip_cross_entropy(x, t[:0], torch.zeros(3, dtype=torch.long)),
        lambda: vlood_fast.edr_penalty(x[:0], t, eye, eye),
        lambda: vlood_fast.edr_penalty(x, t[:0], eye, eye),
        lambda: vlood_fast.ood_score(x[:0], t),
        lambda: vlood_fast.OgenGenerator(8, num_heads=2).synthesize(x[:0], t, t, k=1),
        lambda: vlood_fast.ood_metrics([], [0.5]),
    ]
    for case in cases:
        with pytest.raises(ValueError):
            case()


def test_finite_checks_are_opt_in(rng, monkeypatch):
    x, t = unit(rng, 3, 8), unit(rng, 4, 8)
    bad = x.clone()
    bad[1, 2] = float("nan")
    eye = torch.eye(8)
    inf_eye = eye.clone()
    inf_eye[0, 0] = float("inf")
    gen = vlood_fast.OgenGenerator(8, num_heads=2)
    calls = {
        "image_features": lambda: vlood_fast.energy_score(bad, t),
        "text_features": lambda: vlood_fast.clip_cross_entropy(x, bad.repeat(2, 1)[:4], torch.zeros(3, dtype=torch.long)),
        "z": lambda: vlood_fast.edr_penalty(bad, t, eye, eye),
        "image_weight": lambda: vlood_fast.edr_penalty(x, t, inf_eye, eye),
        "queries": lambda: gen.synthesize(bad, t, t, k=1),
    }
    # off by default: no device sync, NaN goes through
    assert torch.isnan(vlood_fast.energy_score(bad, t)).any()
    monkeypatch.setenv("VLOOD_FAST_CHECK_FINITE", "1")
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
            call()
