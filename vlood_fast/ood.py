"""OOD scores, detection metrics and base/new accuracy (pure torch + numpy).

Convention everywhere: **higher score = more in-distribution (ID)**.

Scores (``ood_score`` from features, ``ood_score_from_logits`` from logits ``l = s x . t_k``):

- ``"energy"``: the negative free energy ``T * logsumexp_k(l_k / T)`` (= ``-vlood_fast.energy_score``),
  computed without materializing the logits when given features.
- ``"mcm"``: maximum softmax probability ``max_k softmax(l / T)_k`` (MSP; MCM of Ming et al.
  2022 is this on CLIP similarities, with its ``logit_scale / T`` = 1).
- ``"max_logit"``: ``max_k l_k / T``.

Metrics (all in ``[0, 1]``, not percent; ID and OOD score arrays, any lengths):

- ``auroc``: area under the ROC curve with ID as the positive class; ties count one half
  (equals ``sklearn.metrics.roc_auc_score``).
- ``fpr_at_tpr`` (FPR95 by default): sweep thresholds ``lam`` over the distinct score values and
  accept a sample when ``score >= lam`` (ties are accepted or rejected together, as the points
  of ``sklearn.metrics.roc_curve``). Take the largest ``lam`` keeping at least ``tpr`` of the ID
  scores; FPR95 is the fraction of OOD scores ``>= lam``. Equals
  ``fpr[argmax(tpr_curve >= 0.95)]`` of ``roc_curve(..., drop_intermediate=False)``. (The
  CRoFT/Hendrycks code picks the ROC point *closest* to 95% instead; the two can differ by one
  ROC step.)
- ``aupr_in``: average precision with ID positive and the scores as given;
  ``aupr_out``: OOD positive and the negated scores. Both equal
  ``sklearn.metrics.average_precision_score`` (step-wise sum, no interpolation).

CRoFT's threshold convention: ``croft_threshold`` = the 5th percentile (linear interpolation, as
``numpy.percentile``) of the scores of correctly classified ID validation samples, and
``fpr_at_threshold`` = fraction of OOD scores strictly above it.
"""
import math
from numbers import Real

import numpy as np
import torch

from . import _validation as V
from .ops.similarity_lse import similarity_logsumexp

METHODS = ("energy", "mcm", "max_logit")

__all__ = [
    "METHODS", "accuracy", "aupr_in", "aupr_out", "auroc", "base_new_accuracy",
    "croft_threshold", "fpr_at_threshold", "fpr_at_tpr", "harmonic_mean", "ood_metrics",
    "ood_score", "ood_score_from_logits",
]


# ---------------------------------------------------------------- scores
def ood_score(image_features, text_features, method="energy", logit_scale=100.0, temperature=1.0):
    """Per-image OOD score from CLIP features, higher = in-distribution.

    Args:
        image_features: ``[B, D]`` float tensor (normalize first for CLIP).
        text_features: ``[K, D]``, same dtype and device.
        method: ``"energy" | "mcm" | "max_logit"`` (see the module docstring).
        logit_scale: s in ``l = s x . t_k`` (100 for trained CLIP).
        temperature: T > 0.
    Returns:
        ``[B]`` float32 tensor (float64 for float64 input); differentiable.

    Example::

        s_id = ood_score(img_id, txt, "energy"); s_ood = ood_score(img_ood, txt, "energy")
        ood_metrics(s_id, s_ood)["auroc"]
    """
    V.check_choice("method", method, METHODS)
    logit_scale = V.check_positive("logit_scale", logit_scale)
    temperature = V.check_positive("temperature", temperature)
    V.check_matrix("image_features", image_features, "[B, D]")
    V.check_matrix("text_features", text_features, "[K, D]")
    V.check_same_dim("image_features", image_features, "text_features", text_features)
    V.check_compatible(image_features=image_features, text_features=text_features)
    if method == "energy":
        return temperature * similarity_logsumexp(image_features, text_features,
                                                  logit_scale / temperature)
    acc = torch.float64 if image_features.dtype == torch.float64 else torch.float32
    logits = logit_scale * (image_features.to(acc) @ text_features.to(acc).t())
    return _score_logits(logits, method, temperature)


def ood_score_from_logits(logits, method="energy", temperature=1.0):
    """The same scores from precomputed logits ``[B, K]`` (already multiplied by the logit scale).

    Example::

        scores = ood_score_from_logits(100 * img @ txt.T, "mcm")   # [B], higher = ID
    """
    V.check_choice("method", method, METHODS)
    temperature = V.check_positive("temperature", temperature)
    V.check_matrix("logits", logits, "[B, K]")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return _score_logits(logits.to(acc), method, temperature)


def _score_logits(logits, method, temperature):
    z = logits / temperature
    if method == "energy":
        return temperature * torch.logsumexp(z, dim=1)
    if method == "max_logit":
        return z.max(dim=1).values
    return torch.exp(z.max(dim=1).values - torch.logsumexp(z, dim=1))  # max softmax, stable


# ---------------------------------------------------------------- metric helpers
def _scores(name, values) -> np.ndarray:
    """A finite, non-empty 1-D float64 numpy array from a tensor, array or sequence."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a 1-D array or tensor of numbers [N], "
                        f"got {type(values).__name__}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must have shape [N], got {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must be non-empty with shape [N]")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite; it holds {int((~np.isfinite(arr)).sum())} "
                         f"NaN/inf values")
    return arr


def _curve(pos, neg):
    """Cumulative (true, false) positive counts at each distinct threshold, high to low.

    A sample is accepted at threshold ``lam`` when its score >= lam, so tied scores enter
    together. Returns (tps, fps, thresholds) as float64 arrays of one length.
    """
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-scores, kind="stable")
    scores, is_pos = scores[order], is_pos[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(scores) != 0), scores.size - 1]
    tps = np.cumsum(is_pos)[last_of_group]
    fps = (last_of_group + 1) - tps
    return tps, fps, scores[last_of_group]


def auroc(id_scores, ood_scores) -> float:
    """Area under the ROC curve, ID positive: ``P(s_id > s_ood) + P(s_id == s_ood) / 2``.

    Args: ``id_scores [N_id]``, ``ood_scores [N_ood]`` (tensors, arrays or lists), higher = ID.

    Example::

        auroc(torch.tensor([3., 2.]), [1., 2.])   # 0.875
    """
    tps, fps, _ = _curve(_scores("id_scores", id_scores), _scores("ood_scores", ood_scores))
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def fpr_at_tpr(id_scores, ood_scores, tpr=0.95) -> float:
    """FPR on OOD at the highest threshold that keeps at least ``tpr`` of ID (FPR95 by default).

    Precisely: with thresholds ``lam`` over the distinct scores and acceptance ``score >= lam``,
    ``lam* = max{lam : mean(id >= lam) >= tpr}`` and the result is ``mean(ood >= lam*)``.

    Example::

        fpr_at_tpr(torch.arange(1., 21.), [0.5, 1.5, 10.])   # lam* = 2 keeps 19/20 ID -> 1/3
    """
    if isinstance(tpr, bool) or not isinstance(tpr, Real) or not 0 < tpr <= 1:
        raise ValueError(f"tpr must be a number in (0, 1], got {tpr!r}")
    tps, fps, _ = _curve(_scores("id_scores", id_scores), _scores("ood_scores", ood_scores))
    first = int(np.argmax(tps / tps[-1] >= tpr))
    return float(fps[first] / fps[-1])


def _average_precision(pos, neg) -> float:
    tps, fps, _ = _curve(pos, neg)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupr_in(id_scores, ood_scores) -> float:
    """Average precision with ID as the positive class (scores as given).

    ``AP = sum_n (R_n - R_{n-1}) P_n`` over the distinct thresholds, high to low.

    Example::

        aupr_in([3., 2.], [1., 2.])
    """
    return _average_precision(_scores("id_scores", id_scores), _scores("ood_scores", ood_scores))


def aupr_out(id_scores, ood_scores) -> float:
    """Average precision with OOD as the positive class, ranked by the negated scores.

    Example::

        aupr_out([3., 2.], [1., 2.])
    """
    return _average_precision(-_scores("ood_scores", ood_scores), -_scores("id_scores", id_scores))


def ood_metrics(id_scores, ood_scores, tpr=0.95) -> dict:
    """All four detection metrics: ``{"auroc", "fpr95", "aupr_in", "aupr_out"}`` as floats in [0, 1].

    ``"fpr95"`` is ``fpr_at_tpr(..., tpr)`` (its key stays "fpr95" for any ``tpr``).

    Example::

        m = ood_metrics(ood_score(img_id, txt), ood_score(img_ood, txt))
        print(f"AUROC {100 * m['auroc']:.2f}  FPR95 {100 * m['fpr95']:.2f}")
    """
    id_scores = _scores("id_scores", id_scores)
    ood_scores = _scores("ood_scores", ood_scores)
    return {
        "auroc": auroc(id_scores, ood_scores),
        "fpr95": fpr_at_tpr(id_scores, ood_scores, tpr),
        "aupr_in": aupr_in(id_scores, ood_scores),
        "aupr_out": aupr_out(id_scores, ood_scores),
    }


# ---------------------------------------------------------------- CRoFT threshold convention
def croft_threshold(id_scores, correct=None, percentile=5.0) -> float:
    """CRoFT's detection threshold: the ``percentile``-th percentile of correctly classified ID scores.

    Args:
        id_scores: ``[N]`` scores of ID validation samples (higher = ID).
        correct: optional boolean ``[N]`` mask (prediction == label); ``None`` uses all.
        percentile: in [0, 100]; linear interpolation as ``numpy.percentile``.

    Example::

        lam = croft_threshold(s_val, pred_val == y_val)
        fpr = fpr_at_threshold(s_ood, lam)
    """
    scores = _scores("id_scores", id_scores)
    if isinstance(percentile, bool) or not isinstance(percentile, Real) or not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be a number in [0, 100], got {percentile!r}")
    if correct is not None:
        if isinstance(correct, torch.Tensor):
            correct = correct.detach().cpu().numpy()
        correct = np.asarray(correct)
        if correct.shape != scores.shape:
            raise ValueError(f"correct must have shape [{scores.size}] like id_scores, got {correct.shape}")
        if correct.dtype != np.bool_:
            raise TypeError(f"correct must be a boolean mask, got dtype {correct.dtype}")
        scores = scores[correct]
        if scores.size == 0:
            raise ValueError("correct selects no samples: no ID sample is correctly classified")
    return float(np.percentile(scores, percentile))


def fpr_at_threshold(ood_scores, threshold) -> float:
    """Fraction of OOD scores strictly above ``threshold`` (accepted as ID), as CRoFT reports it.

    Example::

        fpr_at_threshold([0.1, 0.7, 0.9], 0.5)   # 2/3
    """
    scores = _scores("ood_scores", ood_scores)
    if isinstance(threshold, torch.Tensor) and threshold.numel() == 1:
        threshold = threshold.item()
    if isinstance(threshold, bool) or not isinstance(threshold, Real) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    return float(np.mean(scores > float(threshold)))


# ---------------------------------------------------------------- accuracy
def accuracy(predictions, labels) -> float:
    """Top-1 accuracy in [0, 1] from logits ``[N, K]`` (argmax) or predicted labels ``[N]``.

    Example::

        accuracy(100 * img @ txt.T, labels)
    """
    predictions = torch.as_tensor(predictions)
    labels = torch.as_tensor(labels)
    if predictions.dim() == 2:
        predictions = predictions.argmax(dim=1)
    if predictions.dim() != 1 or labels.dim() != 1 or predictions.shape != labels.shape:
        raise ValueError(f"predictions must be logits [N, K] or labels [N] matching labels [N]; "
                         f"got predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError("labels must be non-empty")
    return float((predictions.cpu().long() == labels.cpu().long()).double().mean())


def harmonic_mean(base, new) -> float:
    """``2 b n / (b + n)`` (0 when both are 0): the base-to-new "HM" of CoOp/CoCoOp/OGEN."""
    base, new = float(base), float(new)
    if base < 0 or new < 0:
        raise ValueError(f"accuracies must be non-negative, got base={base}, new={new}")
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def base_new_accuracy(base_predictions, base_labels, new_predictions, new_labels) -> dict:
    """``{"base", "new", "hm"}``: accuracies on base and new classes and their harmonic mean.

    Predictions are logits or labels (see ``accuracy``); each split is scored on its own classes.

    Example::

        base_new_accuracy(img_b @ txt_base.T, y_b, img_n @ txt_new.T, y_n)["hm"]
    """
    base = accuracy(base_predictions, base_labels)
    new = accuracy(new_predictions, new_labels)
    return {"base": base, "new": new, "hm": harmonic_mean(base, new)}
