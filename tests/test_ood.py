"""OOD scores and metrics against scikit-learn and plain PyTorch, ties included."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from vlood_fast import energy_score
from vlood_fast.ood import (accuracy, aupr_in, aupr_out, auroc, base_new_accuracy, croft_threshold,
                            fpr_at_threshold, fpr_at_tpr, harmonic_mean, ood_metrics, ood_score,
                            ood_score_from_logits)


def _sklearn_metrics(s_id, s_ood, tpr=0.95):
    y = np.r_[np.ones(s_id.size), np.zeros(s_ood.size)]
    s = np.r_[s_id, s_ood]
    fpr_curve, tpr_curve, _ = roc_curve(y, s, drop_intermediate=False)
    return {
        "auroc": roc_auc_score(y, s),
        "fpr95": fpr_curve[np.argmax(tpr_curve >= tpr)],
        "aupr_in": average_precision_score(y, s),
        "aupr_out": average_precision_score(1 - y, -s),
    }


def _random_scores(rng, n_id, n_ood, levels):
    """Continuous scores, or integer scores with heavy ties (shared across ID and OOD)."""
    if levels is None:
        return rng.normal(1.0, 1.0, n_id), rng.normal(0.0, 1.0, n_ood)
    return (rng.integers(0, levels, n_id).astype(float) + 1.0,
            rng.integers(0, levels, n_ood).astype(float) * 0.8 + 0.5)


@pytest.mark.parametrize("levels", [None, 2, 3, 7, 40])
def test_metrics_match_sklearn(levels):
    rng = np.random.default_rng(levels or 0)
    for trial in range(30):
        n_id, n_ood = rng.integers(1, 60, 2)
        s_id, s_ood = _random_scores(rng, n_id, n_ood, levels)
        expected = _sklearn_metrics(s_id, s_ood)
        got = ood_metrics(s_id, s_ood)
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, abs=1e-12), (name, trial, s_id, s_ood)


_tied_lists = st.lists(st.integers(-3, 3).map(lambda v: v / 2), min_size=1, max_size=25)


@settings(max_examples=150, deadline=None)
@given(s_id=_tied_lists, s_ood=_tied_lists)
def test_metrics_match_sklearn_property(s_id, s_ood):
    """Tiny inputs (one sample per side allowed) with many ties."""
    s_id, s_ood = np.array(s_id), np.array(s_ood)
    expected = _sklearn_metrics(s_id, s_ood)
    got = ood_metrics(s_id, s_ood)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


@pytest.mark.parametrize("tpr", [0.5, 0.8, 0.9, 0.99, 1.0])
def test_fpr_at_other_tpr_matches_sklearn(tpr):
    rng = np.random.default_rng(7)
    for _ in range(20):
        s_id, s_ood = _random_scores(rng, 37, 23, 5)
        assert fpr_at_tpr(s_id, s_ood, tpr) == pytest.approx(
            _sklearn_metrics(s_id, s_ood, tpr)["fpr95"], abs=1e-12)


def test_fpr95_hand_example_with_a_tie_at_the_threshold():
    s_id = np.arange(1.0, 21.0)            # 20 ID scores
    # lam* = 2 keeps exactly 19/20 ID; OOD at exactly 2.0 is accepted with it (score >= lam)
    assert fpr_at_tpr(s_id, [0.5, 1.5, 10.0]) == pytest.approx(1 / 3)
    assert fpr_at_tpr(s_id, [0.5, 2.0, 10.0]) == pytest.approx(2 / 3)
    # a tie inside ID: two ID scores at 2 -> lam* = 2 keeps 20/21 >= 0.95, 1.5 rejected
    assert fpr_at_tpr(np.r_[s_id, 2.0], [1.5, 3.0]) == pytest.approx(1 / 2)


def test_hand_examples_auroc_aupr():
    assert auroc([3.0, 2.0], [1.0, 2.0]) == pytest.approx(0.875)
    assert auroc([1.0, 1.0], [1.0]) == pytest.approx(0.5)
    assert auroc([2.0], [1.0]) == 1.0 and auroc([1.0], [2.0]) == 0.0
    # perfect separation: both APs are 1
    assert aupr_in([5.0, 6.0], [1.0, 2.0]) == 1.0 and aupr_out([5.0, 6.0], [1.0, 2.0]) == 1.0
    # fully inverted ranking: AP_in = mean precision at ID ranks 3 and 4 = (1/3 + 2/4) / 2
    assert aupr_in([1.0, 2.0], [5.0, 6.0]) == pytest.approx((1 / 3 + 2 / 4) / 2)


def test_metrics_accept_tensors_and_are_order_invariant():
    g = torch.Generator().manual_seed(3)
    s_id = torch.randn(50, generator=g) + 1
    s_ood = torch.randn(40, generator=g)
    ref = ood_metrics(s_id.numpy(), s_ood.numpy())
    perm = torch.randperm(50, generator=g)
    got = ood_metrics(s_id[perm].to(torch.float16).float(), s_ood.tolist())
    assert got["auroc"] == pytest.approx(roc_auc_score(
        np.r_[np.ones(50), np.zeros(40)], np.r_[s_id[perm].half().float().numpy(), s_ood.numpy()]))
    assert ood_metrics(s_id[perm], s_ood) == pytest.approx(ref)


def test_metric_errors():
    with pytest.raises(ValueError, match="ood_scores must be non-empty"):
        auroc([1.0], [])
    with pytest.raises(ValueError, match=r"id_scores must have shape \[N\]"):
        auroc(np.ones((2, 2)), [1.0])
    with pytest.raises(ValueError, match="finite"):
        ood_metrics([1.0, float("nan")], [0.0])
    with pytest.raises(ValueError, match="tpr"):
        fpr_at_tpr([1.0], [0.0], tpr=0.0)
    with pytest.raises(TypeError, match="id_scores"):
        auroc(["a", "b"], [1.0])


# ---------------------------------------------------------------- scores
def _features(g, b=9, k=6, d=16, dtype=torch.float64):
    x = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1)
    t = F.normalize(torch.randn(k, d, generator=g, dtype=dtype), dim=1)
    return x, t


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_scores_match_plain_torch(rng, temperature):
    x, t = _features(rng)
    logits = 100.0 * x @ t.T
    z = logits / temperature
    expected = {
        "energy": temperature * torch.logsumexp(z, 1),
        "mcm": torch.softmax(z, 1).max(1).values,
        "max_logit": z.max(1).values,
    }
    for method, value in expected.items():
        torch.testing.assert_close(ood_score(x, t, method, 100.0, temperature), value, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ood_score_from_logits(logits, method, temperature), value,
                                   rtol=1e-10, atol=1e-12)
    # energy score = -(free energy) of the fused op
    torch.testing.assert_close(ood_score(x, t, "energy", 100.0, temperature),
                               -energy_score(x, t, 100.0, temperature))


def test_scores_fp32_output_and_gradient(rng):
    x, t = _features(rng, dtype=torch.float32)
    x.requires_grad_(True)
    s = ood_score(x, t, "energy", logit_scale=10.0)
    assert s.dtype == torch.float32 and s.shape == (9,)
    s.sum().backward()
    # d/dx T*lse(s x t^T / T) = s * softmax @ t
    p = torch.softmax(10.0 * x.detach() @ t.T, 1)
    torch.testing.assert_close(x.grad, 10.0 * p @ t, rtol=1e-5, atol=1e-6)


def test_energy_separates_id_from_ood(rng):
    """Features near a class text score higher than features far from every class."""
    _, t = _features(rng, k=5, d=32)
    noise = 0.1 * torch.randn(40, 32, generator=rng, dtype=t.dtype)
    near = F.normalize(t[torch.arange(40) % 5] + noise, dim=1)
    far = F.normalize(torch.randn(40, 32, generator=rng, dtype=t.dtype), dim=1)
    for method in ("energy", "mcm", "max_logit"):
        m = ood_metrics(ood_score(near, t, method), ood_score(far, t, method))
        assert m["auroc"] > 0.9 and m["fpr95"] < 0.5


def test_score_errors(rng):
    x, t = _features(rng)
    with pytest.raises(ValueError, match="method must be one of"):
        ood_score(x, t, "entropy")
    with pytest.raises(ValueError, match=r"text_features must have shape \[K, D\]"):
        ood_score(x, t[0])
    with pytest.raises(ValueError, match="temperature"):
        ood_score_from_logits(x @ t.T, "mcm", temperature=0.0)


# ---------------------------------------------------------------- threshold, accuracy
def test_croft_threshold_and_fpr_at_threshold():
    rng = np.random.default_rng(5)
    s = rng.normal(size=200)
    correct = rng.random(200) > 0.3
    lam = croft_threshold(torch.from_numpy(s), torch.from_numpy(correct))
    assert lam == pytest.approx(np.percentile(s[correct], 5))
    assert croft_threshold(s) == pytest.approx(np.percentile(s, 5))
    assert 0.93 < np.mean(s[correct] >= lam) < 0.96  # about 95% of correct ID kept
    ood = rng.normal(-1.0, 1.0, size=300)
    assert fpr_at_threshold(ood, lam) == pytest.approx(np.mean(ood > lam))
    assert fpr_at_threshold([0.1, 0.5, 0.9], 0.5) == pytest.approx(1 / 3)  # strictly above
    assert fpr_at_threshold([0.1, 0.5, 0.9], np.float32(0.2)) == pytest.approx(2 / 3)
    assert fpr_at_threshold(torch.tensor([0.1, 0.5, 0.9]), torch.tensor(0.05)) == 1.0
    with pytest.raises(ValueError, match="correct must have shape"):
        croft_threshold(s, correct[:5])
    with pytest.raises(ValueError, match="no ID sample"):
        croft_threshold(s, np.zeros(200, dtype=bool))


def test_accuracy_and_harmonic_mean():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [1.0, 4.0]])
    labels = torch.tensor([0, 1, 1, 1])
    assert accuracy(logits, labels) == pytest.approx(0.75)
    assert accuracy(np.array([0, 1, 0, 0]), [0, 1, 1, 1]) == pytest.approx(0.5)
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    assert harmonic_mean(0.0, 0.0) == 0.0
    result = base_new_accuracy(logits, labels, labels, labels)
    assert result == pytest.approx({"base": 0.75, "new": 1.0, "hm": 2 * 0.75 / 1.75})
    with pytest.raises(ValueError, match="predictions must be logits"):
        accuracy(logits, labels[:3])
