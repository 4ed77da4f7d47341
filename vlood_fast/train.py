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
from .ops.similarity_lse import similarity_logsumexp

__all__ = ["TrainConfig", "TrainResult", "train_croft", "train_ogen", "evaluate_text_classifier"]


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


def train_croft(train_features, train_labels, text_features, *, eval_sets=None, ood_sets=None,
                config=None, wccf=True, preset="setup1", lambda1=1.0, lambda2=5.0, gen_steps=1,
                ratio=0.2, ratio_text=0.5, logit_scale=100.0, device="cpu") -> TrainResult:
    """Train CRoFT's adapters (and WCCF shift generator) on cached CLIP features.

    Args:
        train_features: ``[N, D]`` frozen, normalized image features; train_labels ``[N]``.
        text_features: ``[K, D]`` frozen, normalized class text features.
        eval_sets: ``{name: (features, labels)}`` scored every epoch (accuracy, ``<name>_acc``);
            the first one selects the best epoch unless ``config.select`` says otherwise.
        ood_sets: ``{name: features}`` of unknown classes: AUROC / FPR95 of the energy score
            against the first eval set, every epoch (``<name>_auroc``, ``<name>_fpr95``).
        wccf: train the shift generator (``gen_steps`` generator steps before each main step).
        preset, lambda1, lambda2, ratio, ratio_text, logit_scale: see ``CroftLoss``.
    Returns:
        ``TrainResult`` with modules ``adapter`` (and ``generator``), holding the best epoch.

    Example::

        result = train_croft(feats, labels, text, eval_sets={"val": (vf, vl)}, ood_sets={"ood": of})
        adapter = result["adapter"]
    """
    from .croft import CroftAdapter, CroftLoss, ShiftGenerator, croft_ood_score

    config = _config(config, 0.1)
    seed_everything(config.seed)
    x = _features("train_features", train_features, device)
    N, D = x.shape
    text = _features("text_features", text_features, device)
    if text.shape[1] != D:
        raise ValueError(f"text_features has dim {text.shape[1]}, train_features has {D}")
    y = _labels("train_labels", train_labels, N, text.shape[0], device)
    eval_sets = {k: (_features(f"eval_sets[{k!r}]", f, device), l.to(device))
                 for k, (f, l) in (eval_sets or {}).items()}
    ood_sets = {k: _features(f"ood_sets[{k!r}]", f, device) for k, f in (ood_sets or {}).items()}
    adapter = CroftAdapter(D, ratio, ratio_text).to(device)
    generator = ShiftGenerator(D).to(device) if wccf else None
    criterion = CroftLoss(adapter, generator, preset, lambda1, lambda2, logit_scale)
    sgd = dict(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    optimizers = {"adapter": torch.optim.SGD(adapter.parameters(), **sgd)}
    modules = {"adapter": adapter}
    if wccf:
        optimizers["generator"] = torch.optim.SGD(generator.parameters(), **sgd)
        modules["generator"] = generator

    def step(idx, epoch, progress):
        logs = {}
        if wccf:
            for _ in range(gen_steps):
                g_loss, g_parts = criterion.generator_step(x[idx], y[idx], text)
                optimizers["generator"].zero_grad(set_to_none=True)
                g_loss.backward()
                average_gradients(generator.parameters())
                optimizers["generator"].step()
            logs["gen_total"] = g_parts["total"].item()
        loss, parts = criterion.main(x[idx], y[idx], text)
        optimizers["adapter"].zero_grad(set_to_none=True)
        if generator is not None:
            generator.zero_grad(set_to_none=True)  # the main step does not move M
        loss.backward()
        average_gradients(adapter.parameters())
        optimizers["adapter"].step()
        logs.update({k: v.item() for k, v in parts.items()})
        return logs

    def evaluate(epoch):
        metrics = {}
        v = adapter.text(text)
        first = None
        for name, (feats, labels) in eval_sets.items():
            u = adapter.image(feats)
            metrics[f"{name}_acc"] = _accuracy(u, v, labels)
            first = first if first is not None else u
        for name, feats in ood_sets.items():
            if first is None:
                raise ValueError("ood_sets need an in-distribution eval set to compare against")
            m = ood_metrics(similarity_logsumexp(first, v, logit_scale),
                            croft_ood_score(adapter, feats, text, logit_scale))
            metrics[f"{name}_auroc"], metrics[f"{name}_fpr95"] = m["auroc"], m["fpr95"]
        return metrics

    select = config.select or (f"{next(iter(eval_sets))}_acc" if eval_sets else "train_total")
    return fit(modules=modules, optimizers=optimizers, step=step, evaluate=evaluate,
               num_samples=N, config=config, select=select, maximize=select != "train_total",
               name="croft")


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
