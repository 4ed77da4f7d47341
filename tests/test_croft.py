"""CRoFT modules and objective: identity initialization, the loss terms against a literal
re-implementation, the generator step moving only the generator, a short training run."""
import math

import pytest
import torch
import torch.nn.functional as F

import vlood_fast
from vlood_fast.croft import label_alignment
from vlood_fast.loop import TrainConfig
from vlood_fast.reference.edr import edr_penalty as reference_edr
from vlood_fast.synthetic import make_feature_world
from vlood_fast.train import train_croft


def features(rng, B=12, K=5, D=16):
    x = F.normalize(torch.randn(B, D, generator=rng), dim=1)
    t = F.normalize(torch.randn(K, D, generator=rng), dim=1)
    y = torch.randint(0, K, (B,), generator=rng)
    return x, t, y


def test_untrained_adapter_is_zero_shot(rng):
    x, t, _ = features(rng)
    adapter = vlood_fast.CroftAdapter(16)
    assert torch.allclose(adapter.image(x), x, atol=1e-6)
    assert torch.allclose(adapter.text(t), t, atol=1e-6)
    assert torch.allclose(vlood_fast.ShiftGenerator(16)(x), x, atol=1e-6)


def test_label_alignment_matches_the_pairwise_definition(rng):
    x, t, y = features(rng)
    c = F.normalize(torch.randn(12, 16, generator=rng), dim=1)
    mask = (y[:, None] == y[None, :]).float()
    assert torch.allclose(label_alignment(c, x, y), (mask * (c @ x.T)).mean(), atol=1e-6)


@pytest.mark.parametrize("preset", ["setup1", "setup2"])
@pytest.mark.parametrize("wccf", [True, False])
def test_main_loss_matches_a_literal_implementation(rng, preset, wccf):
    x, t, y = features(rng)
    adapter = vlood_fast.CroftAdapter(16, ratio=0.3, ratio_text=0.6)
    with torch.no_grad():
        adapter.image_weight.add_(0.1 * torch.randn(16, 16, generator=rng))
        adapter.text_weight.add_(0.1 * torch.randn(16, 16, generator=rng))
    gen = vlood_fast.ShiftGenerator(16) if wccf else None
    if gen is not None:
        with torch.no_grad():
            gen.weight.add_(0.2 * torch.randn(16, 16, generator=rng))
    crit = vlood_fast.CroftLoss(adapter, gen, preset=preset, lambda1=0.7, lambda2=3.0)
    total, parts = crit.main(x, y, t)

    s = 100.0
    u = F.normalize(0.3 * x @ adapter.image_weight.T + 0.7 * x, dim=1)
    v = F.normalize(0.6 * t @ adapter.text_weight.T + 0.4 * t, dim=1)
    expected = F.cross_entropy(s * u @ v.T, y)
    z = x
    if wccf:
        c = F.normalize(u @ gen.weight.T + u, dim=1)
        ac = F.normalize(0.3 * c @ adapter.image_weight.T + 0.7 * c, dim=1)
        mask = (y[:, None] == y[None, :]).float()
        expected = expected + F.cross_entropy(s * ac @ v.T, y) - 0.7 * (mask * (c @ x.T)).mean()
        z = torch.cat([x, c])
    kw = dict(potential="sum", penalty="mean") if preset == "setup1" else dict(potential="mean", penalty="sum")
    edr = reference_edr(z, t, adapter.image_weight, adapter.text_weight, 0.3, 0.6, 1.0, **kw)
    expected = expected + 3.0 * edr
    assert torch.allclose(parts["edr"], edr, rtol=1e-4)
    assert torch.allclose(total, expected, rtol=1e-4)
    # gradients reach both adapter weights, through the penalty too
    total.backward()
    assert adapter.image_weight.grad.abs().sum() > 0 and adapter.text_weight.grad.abs().sum() > 0


def test_generator_step_moves_only_the_generator(rng):
    x, t, y = features(rng)
    adapter, gen = vlood_fast.CroftAdapter(16), vlood_fast.ShiftGenerator(16)
    crit = vlood_fast.CroftLoss(adapter, gen)
    loss, parts = crit.generator_step(x, y, t)
    assert set(parts) == {"shift_ce", "align", "total"}
    loss.backward()
    assert gen.weight.grad is not None and gen.weight.grad.abs().sum() > 0
    assert adapter.image_weight.grad is None and adapter.text_weight.grad is None
    with pytest.raises(RuntimeError, match="WCCF is off"):
        vlood_fast.CroftLoss(adapter, None).generator_step(x, y, t)


def test_croft_ood_score_is_the_adapted_logsumexp(rng):
    x, t, _ = features(rng)
    adapter = vlood_fast.CroftAdapter(16)
    with torch.no_grad():
        adapter.image_weight.mul_(1.5)
    expected = torch.logsumexp(100 * adapter.image(x) @ adapter.text(t).T, dim=1)
    assert torch.allclose(vlood_fast.croft_ood_score(adapter, x, t), expected, atol=1e-4)


def test_bad_inputs(rng):
    x, t, y = features(rng)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        vlood_fast.CroftAdapter(0)
    with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\]"):
        vlood_fast.CroftAdapter(16, ratio=-0.1)
    with pytest.raises(ValueError, match="preset must be one of"):
        vlood_fast.CroftLoss(vlood_fast.CroftAdapter(16), preset="setup3")
    with pytest.raises(TypeError, match="adapter must be a CroftAdapter"):
        vlood_fast.CroftLoss(torch.nn.Linear(16, 16))
    crit = vlood_fast.CroftLoss(vlood_fast.CroftAdapter(16), vlood_fast.ShiftGenerator(16))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        crit.main(x, torch.full_like(y, 5), t)
    with pytest.raises(ValueError, match="feature dim 16 but text has 8"):
        crit.main(x, y, t[:, :8])
    with pytest.raises(ValueError, match=r"image features must have shape \[N, 16\]"):
        vlood_fast.CroftAdapter(16).image(x[:, :8])


def test_short_training_run_lowers_the_loss_and_stays_finite():
    world = make_feature_world(num_classes=12, num_unknown=6, dim=32, seed=3)
    x, y = world.sample(8, seed=1)
    val = world.sample(6, seed=2)
    ood = world.sample(6, unknown=True, seed=2)[0]
    result = train_croft(x, y, world.text, eval_sets={"val": val}, ood_sets={"ood": ood},
                         config=TrainConfig(epochs=4, batch_size=16, progress=False), preset="setup2")
    losses = [h["train_total"] for h in result.history]
    assert all(math.isfinite(v) for h in result.history for v in h.values() if isinstance(v, float))
    assert losses[-1] < losses[0]
    assert {"val_acc", "ood_auroc", "ood_fpr95", "train_edr", "train_gen_total"} <= set(result.history[0])
    for p in result["adapter"].parameters():
        assert torch.isfinite(p).all()
