"""Training API: ``train_croft`` (adapters + shift generator on cached features) and
``train_ogen`` (text model, e.g. a prompt learner, + feature generator + local mean teacher).

Both take features that were encoded once (``vlood_fast.clip.encode_images`` through a
``FeatureCache``), so no epoch re-runs a frozen encoder, and both run on ``loop.fit``:
SGD lr 0.002 with one warm-up epoch and cosine decay, per-epoch evaluation, best-epoch
selection, atomic checkpoints, resume, and data parallelism (see ``vlood_fast.loop``).
"""
import dataclasses

import torch

from . import _validation as V
from .loop import TrainConfig, TrainResult, average_gradients, fit, seed_everything
from .ood import harmonic_mean, ood_metrics

__all__ = ["TrainConfig", "TrainResult", "train_ogen", "evaluate_text_classifier"]


def _features(name, tensor, device):
    V.check_matrix(name, tensor, "[N, D]")
    return tensor.detach().to(device=device, dtype=torch.float32)


def _labels(name, labels, n, num_classes, device):
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor of shape [{n}]")
    return V.check_labels(labels.to(device), n, num_classes, torch.device(device))


def _accuracy(features, text, labels):
    return ((features @ text.t()).argmax(dim=1) == labels).float().mean().item()


def evaluate_text_classifier(features, labels, text, logit_scale=100.0, ood_features=None):
    """Accuracy of ``argmax_k x . t_k`` and, with OOD features, the energy-score OOD metrics."""
    metrics = {"acc": _accuracy(features, text, labels)}
    if ood_features is not None:
        from .ops.similarity_lse import similarity_logsumexp
        scores_id = similarity_logsumexp(features, text, logit_scale)
        scores_ood = similarity_logsumexp(ood_features, text, logit_scale)
        metrics.update(ood_metrics(scores_id, scores_ood))
    return metrics


def _config(config, weight_decay):
    config = config or TrainConfig()
    if config.weight_decay is None:
        config = dataclasses.replace(config, weight_decay=weight_decay)
    return config


def train_ogen(train_features, train_labels, text_model, num_base, *, eval_sets=None, config=None,
               generator=None, joint=False, warmup=0.2, teacher=True, m_min=2, m_max=8,
               distill_weight=1.0, logit_scale=100.0, device="cpu") -> TrainResult:
    """Train OGEN: a text model (prompt learner) and a feature generator, with self-distillation.

    Args:
        train_features: ``[N, D]`` normalized image features of base-class images.
        train_labels: ``[N]`` integer labels in ``[0, num_base)``.
        text_model: ``nn.Module``; ``text_model()`` returns normalized text features
            ``[C, D]`` for all C classes, base classes first (``PromptLearner(model, tok,
            base + new)``). Called ONCE per step: base and new text come from one forward.
        num_base: number of base classes (the first rows of the text features).
        eval_sets: optional ``{"base": (features, labels), "new": (features, labels)}``; new
            labels index the new classes (``0 .. C - num_base - 1``). Selection: the harmonic
            mean H if both are given, else base accuracy, else the training loss.
        generator: an ``OgenGenerator`` (default: a fresh one of dim D).
        joint, warmup: ``OgenLoss`` options; teacher: use a ``LocalMeanTeacher`` (snapshot per
            epoch, window growing from m_min to m_max); distill_weight: its loss weight.
    Returns:
        ``TrainResult`` with modules ``text_model``, ``generator`` (and ``teacher``).

    Example::

        learner = PromptLearner(model, tokenizer, base_names + new_names)
        result = train_ogen(feats, labels, learner, len(base_names), config=TrainConfig(epochs=5))
    """
    from .ogen import ClassStatistics, OgenGenerator, OgenLoss
    from .teacher import LocalMeanTeacher

    config = _config(config, 5e-4)
    seed_everything(config.seed)
    x = _features("train_features", train_features, device)
    N, D = x.shape
    y = _labels("train_labels", train_labels, N, num_base, device)
    with torch.no_grad():
        text0 = text_model()
    V.check_matrix("text_model()", text0, "[C, D]")
    if text0.shape[1] != D:
        raise ValueError(f"text_model() returns features of dim {text0.shape[1]}, images have {D}")
    num_new = text0.shape[0] - num_base
    if num_base < 1 or num_new < 3:
        raise ValueError(f"need >= 1 base and >= 3 new classes, got {num_base} base and "
                         f"{num_new} new (text_model() has {text0.shape[0]} rows)")
    stats = ClassStatistics(num_base, D).to(device).update(x, y)
    generator = (generator or OgenGenerator(D)).to(device)
    criterion = OgenLoss(generator, stats.mean, stats.std, logit_scale=logit_scale,
                         warmup=warmup, joint=joint, distill_weight=distill_weight)
    params = [p for p in text_model.parameters() if p.requires_grad] + list(generator.parameters())
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    mean_teacher = LocalMeanTeacher(text_model, m_min, m_max) if teacher else None
    teacher_text = {}  # the teacher changes once per epoch: its text features are cached

    def step(idx, epoch, progress):
        text = text_model()  # the one text forward of this step: base and new classes
        if mean_teacher is not None and not teacher_text and mean_teacher.snapshots:
            teacher_text["all"] = mean_teacher().detach()  # after a resume
        kwargs = {}
        if teacher_text:
            kwargs = dict(teacher_text_features=teacher_text["all"][:num_base],
                          teacher_new_text_features=teacher_text["all"][num_base:])
        loss, parts = criterion(x[idx], y[idx], text[:num_base], text[num_base:], progress, **kwargs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params)
        optimizer.step()
        return {k: v.item() for k, v in parts.items()}

    def evaluate(epoch):
        if mean_teacher is not None:
            mean_teacher.update(text_model, (epoch + 1) / config.epochs)
            teacher_text["all"] = mean_teacher().detach()
        metrics = {}
        if eval_sets:
            text = text_model()
            for split, rows in (("base", text[:num_base]), ("new", text[num_base:])):
                if split in eval_sets:
                    feats, labels = eval_sets[split]
                    metrics[f"{split}_acc"] = _accuracy(feats.to(device).float(), rows, labels.to(device))
            if "base_acc" in metrics and "new_acc" in metrics:
                metrics["hm"] = harmonic_mean(metrics["base_acc"], metrics["new_acc"])
        return metrics

    modules = {"text_model": text_model, "generator": generator}
    if mean_teacher is not None:
        modules["teacher"] = mean_teacher
    select = config.select or ("hm" if eval_sets and {"base", "new"} <= set(eval_sets)
                               else "base_acc" if eval_sets and "base" in eval_sets else "train_total")
    result = fit(modules=modules, optimizers={"ogen": optimizer}, step=step, evaluate=evaluate,
                 num_samples=N, config=config, select=select, maximize=select != "train_total",
                 name="ogen")
    return result
