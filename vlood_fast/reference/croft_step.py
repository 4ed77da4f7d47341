"""One CRoFT training step the way the paper's code runs it, for the benchmark baseline.

Per step, CRoFT's trainer (``CoOp/trainers/CRoFT.py``: ``forward``, ``feature_perturbation``,
``EDR``, ``forward_backward``) computes the adapted logits and their logsumexp energy, runs
the generator step(s), calls ``feature_perturbation`` once more to get the shifted features
(recomputing its logits and loss), then in ``EDR`` builds the shifted logits, stacks the rows,
computes ``exp`` of the full similarity matrix once without and once with a perturbation
``delta`` of both adapter weights, and differentiates the difference w.r.t. delta with
``autograd.grad(create_graph=True)``; the squared gradient is back-propagated again.

``paper_croft_step`` reproduces that work with our modules and our conventions (penalty at W,
consistent adapter map, generator step updating only the generator), so that the benchmark
compares the same math done two ways.
"""
import torch
import torch.nn.functional as F


def _align(x, y, labels):
    mask = (labels[:, None] == labels[None, :]).to(x.dtype)
    return (mask * (x @ y.t())).mean()


def _adapt(x, weight, ratio):
    return F.normalize(ratio * x @ weight.t() + (1 - ratio) * x, dim=1)


def paper_croft_step(features, labels, text, adapter, generator, opt_adapter, opt_generator,
                     lambda1=1.0, lambda2=5.0, logit_scale=100.0, gen_steps=1, preset="setup1"):
    r, rt = adapter.ratio, adapter.ratio_text
    wi, wt = adapter.image_weight, adapter.text_weight
    # model forward: adapted features, logits and their energy
    u, v = _adapt(features, wi, r), _adapt(text, wt, rt)
    logits = logit_scale * u @ v.t()
    torch.logsumexp(logits, dim=1)  # the energy the forward returns
    # generator steps
    for _ in range(gen_steps):
        c = F.normalize(u.detach() @ generator.weight.t() + u.detach(), dim=1)
        loss_g = F.cross_entropy(logit_scale * c @ v.detach().t(), labels) + lambda1 * _align(c, u.detach(), labels)
        opt_generator.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_generator.step()
    # feature_perturbation again, for its shifted features (its loss is recomputed and unused)
    c = F.normalize(u @ generator.weight.t() + u, dim=1)
    F.cross_entropy(logit_scale * c @ v.t(), labels) + lambda1 * _align(c, u, labels)
    # EDR: shifted logits, stacked rows, the energy-gradient penalty by double backward
    ac = _adapt(c, wi, r)
    loss1 = F.cross_entropy(logit_scale * ac @ v.t(), labels) - lambda1 * _align(c, features, labels)
    z = torch.cat([features, c])
    adapted = torch.cat([u, ac])
    pred = torch.exp(adapted @ v.t())
    D = wi.shape[0]
    delta = torch.zeros(D, D, dtype=wi.dtype, requires_grad=True)
    pred_new = torch.exp(_adapt(z, wi + delta, r) @ _adapt(text, wt + delta, rt).t())
    pred_delta = pred_new - pred
    if preset == "setup1":
        (grad,) = torch.autograd.grad(pred_delta.sum(), delta, create_graph=True)
        loss2 = (grad ** 2).mean()
    else:
        (grad,) = torch.autograd.grad(pred_delta.mean(), delta, create_graph=True)
        loss2 = (grad ** 2).sum()
    loss = F.cross_entropy(logits, labels) + loss1 + lambda2 * loss2
    opt_adapter.zero_grad(set_to_none=True)
    generator.zero_grad(set_to_none=True)
    loss.backward()
    opt_adapter.step()
    return loss.detach()


def vlood_croft_step(features, labels, text, criterion, opt_adapter, opt_generator, gen_steps=1):
    """vlood_fast's step (``CroftLoss.step``): adapted rows shared by both steps, fused CE,
    closed-form EDR from the same rows."""
    return criterion.step(features, labels, text, opt_adapter, opt_generator, gen_steps)["total"]
