"""Fused CLIP similarity + logsumexp, and the two public ops built on it.

``similarity_logsumexp(x, t, c)[b] = logsumexp_k(c * x_b . t_k)`` is the one hot path under
the energy score (``-T * lse`` with c = s / T) and the CLIP cross-entropy (``lse - s x_b . t_y``).
It never keeps the B x K logits: the forward streams K in chunks with an online logsumexp and
saves only the per-row lse (fp32); the backward recomputes each chunk from it.

Twice differentiable: the backward is itself an autograd Function (``_SimilarityLSEGrad``)
whose own backward is a closed form, so energy-gradient penalties can differentiate through it.
"""
import torch
from torch.autograd.function import once_differentiable

from .. import _validation as V
from ..dispatch import resolve_backend
from ..reference import energy as reference

CHUNK_ELEMENTS = 1 << 20  # ~4 MB of fp32 logits per chunk: big GEMMs, cache-sized temporaries


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 always, fp64 for fp64 checking inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk(rows: int, cols: int) -> int:
    return max(1, min(cols, CHUNK_ELEMENTS // max(rows, 1)))


# ---------------------------------------------------------------- torch path (chunked over K)
def _torch_forward(x, t, scale, keep_probabilities=False):
    """(lse, P): P is the B x K probability matrix when it fits in one chunk and was asked for.

    Within one chunk, keeping P (at most CHUNK_ELEMENTS floats) is cheaper than the backward
    GEMM that would recompute it; above that size the backward recomputes chunk by chunk.
    """
    acc = _acc_dtype(x.dtype)
    xs = x.to(acc) * scale  # scale the B x D side once instead of every B x K chunk
    step = _chunk(x.shape[0], t.shape[0])
    if step >= t.shape[0]:
        logits = torch.mm(xs, t.to(acc).t())
        lse = torch.logsumexp(logits, dim=1)
        probabilities = logits.sub_(lse[:, None]).exp_() if keep_probabilities else None
        return lse, probabilities
    lse = None
    for k0 in range(0, t.shape[0], step):
        chunk_lse = torch.logsumexp(torch.mm(xs, t[k0:k0 + step].to(acc).t()), dim=1)
        lse = chunk_lse if lse is None else torch.logaddexp(lse, chunk_lse)
    return lse, None


def _torch_probabilities(xs, t_chunk, neg_lse):
    """P = exp(xs t^T - lse) for one chunk: one GEMM with the bias folded in, one exp."""
    return torch.addmm(neg_lse, xs, t_chunk.t()).exp_()


def _target_similarity(x, t, labels, scale, acc):
    """scale * x_b . t_{y_b}: a [B, D] gather, never a B x K pass."""
    return (x.to(acc) * t[labels].to(acc)).sum(dim=1).mul_(scale)


def _torch_grad(x, t, lse, g, h, labels, scale, need_x, need_t, probabilities=None):
    """dx = c W t, dt = c W^T x with W = diag(g) P + diag(h) onehot(labels), chunked over K.

    Whenever W factors as diag(g) (P + onehot * ratio) (no labels; or the cross-entropy, where
    h = -g), g and c scale the thin [B, D] operands instead of each B x K chunk.
    """
    acc = lse.dtype
    x32 = x.to(acc)
    xs = x32 * scale
    neg_lse = -lse[:, None]
    factored = labels is None or bool(torch.equal(h, -g))
    if factored:
        row_scale = g * scale
        gx = x32 * row_scale[:, None]
    else:
        gx = xs
    if labels is not None:
        rows = torch.arange(x.shape[0], device=x.device)
        onehot = torch.full_like(g, -1.0) if factored else h
    dx = torch.zeros_like(x32) if need_x else None
    dt = torch.empty(t.shape, dtype=acc, device=t.device) if need_t else None
    step = _chunk(x.shape[0], t.shape[0])
    for k0 in range(0, t.shape[0], step):
        t32 = t[k0:k0 + step].to(acc)
        w = probabilities if probabilities is not None else _torch_probabilities(xs, t32, neg_lse)
        if labels is not None:
            if probabilities is not None:  # never change a kept P in place: a retained graph reuses it
                w = w.clone()
            if not factored:
                w.mul_(g[:, None])
            hit = (labels >= k0) & (labels < k0 + t32.shape[0])
            w.index_put_((rows[hit], labels[hit] - k0), onehot[hit], accumulate=True)
        if need_x:
            dx.addmm_(w, t32)
        if need_t:
            torch.mm(w.t(), gx, out=dt[k0:k0 + step])
    if need_x:
        dx.mul_(row_scale[:, None] if factored else scale)
    return dx, dt


def _torch_grad_backward(x, t, lse, g, h, labels, gdx, gdt, scale):
    """Closed-form vector-Jacobian product of ``_torch_grad`` w.r.t. (x, t, lse, g, h).

    With P_bk = exp(c x_b.t_k - lse_b), Q = g P and M_bk = c (gdx_b . t_k + x_b . gdt_k):
    grad_x = c (Q M) t + c Q gdt, grad_t = c (Q M)^T x + c Q^T gdx,
    grad_g = rowsum(P M), grad_lse = -g * grad_g; the label term (bilinear) adds
    grad_h = M_{b, y_b}, grad_x_b += c h_b gdt_{y_b}, grad_t_{y_b} += c h_b gdx_b.
    """
    acc = lse.dtype
    x32 = x.to(acc)
    xs = x32 * scale
    neg_lse = -lse[:, None]
    grad_x = torch.zeros_like(x32)
    grad_t = torch.empty(t.shape, dtype=acc, device=t.device)
    grad_g = torch.zeros_like(g)
    step = _chunk(x.shape[0], t.shape[0])
    for k0 in range(0, t.shape[0], step):
        t32 = t[k0:k0 + step].to(acc)
        p = _torch_probabilities(xs, t32, neg_lse)
        m = torch.zeros_like(p)
        if gdx is not None:
            m.addmm_(gdx.to(acc), t32.t())
        if gdt is not None:
            m.addmm_(x32, gdt[k0:k0 + step].to(acc).t())
        m.mul_(scale)
        pm = p * m
        grad_g += pm.sum(dim=1)
        q = p.mul_(g[:, None])
        qm = pm.mul_(g[:, None])
        grad_x.addmm_(qm, t32, alpha=scale)
        grad_t_chunk = torch.mm(qm.t(), x32).mul_(scale)
        if gdt is not None:
            grad_x.addmm_(q, gdt[k0:k0 + step].to(acc), alpha=scale)
        if gdx is not None:
            grad_t_chunk.addmm_(q.t(), gdx.to(acc), alpha=scale)
        grad_t[k0:k0 + step] = grad_t_chunk
    grad_lse = -g * grad_g
    grad_h = None
    if labels is not None:
        grad_h = torch.zeros_like(h)
        if gdx is not None:
            grad_h += scale * (gdx.to(acc) * t[labels].to(acc)).sum(dim=1)
            grad_t.index_add_(0, labels, gdx.to(acc) * (scale * h)[:, None])
        if gdt is not None:
            grad_h += scale * (x32 * gdt[labels].to(acc)).sum(dim=1)
            grad_x += gdt[labels].to(acc) * (scale * h)[:, None]
    return grad_x, grad_t, grad_lse, grad_g, grad_h


# ---------------------------------------------------------------- triton path
def _triton_forward(x, t, scale, keep_probabilities=False):
    from ..kernels import similarity_lse as kernels
    return kernels.lse_forward(x, t, scale), None


def _triton_grad(x, t, lse, g, h, labels, scale, need_x, need_t, probabilities=None):
    from ..kernels import similarity_lse as kernels
    g = g.float().contiguous()
    h = None if h is None else h.float().contiguous()
    dx = dt = None
    if need_x:
        dx = kernels.lse_weighted_sum(x, t, lse, g, scale, True, h=h, labels=labels)
    if need_t:
        dt = kernels.lse_weighted_sum(t, x, lse, g, scale, False, h=h, labels=labels)
    return dx, dt


_FORWARD = {"torch": _torch_forward, "triton": _triton_forward}
_GRAD = {"torch": _torch_grad, "triton": _triton_grad}


# ---------------------------------------------------------------- autograd
class _SimilarityLSE(torch.autograd.Function):
    """(x, t, labels) -> (lse, target) with target_b = c x_b . t_{y_b} (empty without labels).

    lse is an output (not only saved) so that in the double backward the gradient reaching
    the saved lse flows back through this node to x and t.
    """

    @staticmethod
    def forward(ctx, x, t, labels, scale, backend):
        lse, probabilities = _FORWARD[backend](x, t, scale, any(ctx.needs_input_grad[:2]))
        if labels is None:
            target = lse.new_empty(0)
            ctx.mark_non_differentiable(target)
        else:
            target = _target_similarity(x, t, labels, scale, lse.dtype)
        ctx.save_for_backward(x, t, lse, labels, probabilities)
        ctx.scale, ctx.backend = scale, backend
        return lse, target

    @staticmethod
    def backward(ctx, g, h):
        x, t, lse, labels, probabilities = ctx.saved_tensors
        need_x, need_t = ctx.needs_input_grad[:2]
        if g is None:
            g = torch.zeros_like(lse)
        if labels is None:
            h = None
        elif h is None:
            h = torch.zeros_like(lse)
        dx, dt = _SimilarityLSEGrad.apply(x, t, lse, g, h, labels, ctx.scale, ctx.backend,
                                          need_x, need_t, probabilities)
        return dx, dt, None, None, None


class _SimilarityLSEGrad(torch.autograd.Function):
    """(x, t, lse, g, h) -> (dx, dt); differentiable once more in closed form (torch ops)."""

    @staticmethod
    def forward(ctx, x, t, lse, g, h, labels, scale, backend, need_x, need_t, probabilities):
        g = g.to(lse.dtype)
        h = None if h is None else h.to(lse.dtype)
        dx, dt = _GRAD[backend](x, t, lse, g, h, labels, scale, need_x, need_t, probabilities)
        ctx.save_for_backward(x, t, lse, g, h, labels)
        ctx.scale = scale
        return (dx.to(x.dtype) if need_x else None, dt.to(t.dtype) if need_t else None)

    @staticmethod
    @once_differentiable
    def backward(ctx, gdx, gdt):
        x, t, lse, g, h, labels = ctx.saved_tensors
        grad_x, grad_t, grad_lse, grad_g, grad_h = _torch_grad_backward(
            x, t, lse, g, h, labels, gdx, gdt, ctx.scale)
        return (grad_x.to(x.dtype), grad_t.to(t.dtype), grad_lse, grad_g, grad_h,
                None, None, None, None, None, None)


# ---------------------------------------------------------------- public ops
def _apply(x, t, labels, scale, backend):
    """The autograd Function eagerly; the opaque custom op while torch.compile traces."""
    if torch.compiler.is_compiling():
        return torch.ops.vlood_fast.similarity_lse(x, t, labels, scale, backend)
    return _SimilarityLSE.apply(x, t, labels, scale, backend)


def _check_pair(image_features, text_features):
    V.check_matrix("image_features", image_features, "[B, D]")
    V.check_matrix("text_features", text_features, "[K, D]")
    V.check_same_dim("image_features", image_features, "text_features", text_features)
    V.check_compatible(image_features=image_features, text_features=text_features)


def similarity_logsumexp(image_features, text_features, scale=1.0, *, backend=None):
    """Row-wise ``logsumexp_k(scale * x_b . t_k)`` without materializing the logits.

    Args:
        image_features: ``[B, D]`` float32/float16/bfloat16/float64.
        text_features: ``[K, D]``, same dtype and device.
        scale: positive number multiplying every similarity.
        backend: ``"reference" | "torch" | "triton"``; default by device (see ``dispatch``).
    Returns:
        ``[B]`` float32 tensor whatever the input dtype (float64 for float64 input).

    Example::

        x, t = F.normalize(torch.randn(8, 512), dim=1), F.normalize(torch.randn(100, 512), dim=1)
        lse = similarity_logsumexp(x, t, 100.0)   # == torch.logsumexp(100 * x @ t.T, 1)
    """
    _check_pair(image_features, text_features)
    scale = V.check_positive("scale", scale)
    which = resolve_backend(image_features.device, image_features.dtype, backend)
    if which == "reference":
        return torch.logsumexp(reference.clip_logits(image_features, text_features, scale), dim=1)
    return _apply(image_features, text_features, None, scale, which)[0]


def energy_score(image_features, text_features, logit_scale=100.0, temperature=1.0, *, backend=None):
    """Free energy of CLIP logits, ``E_b = -T * logsumexp_k(logit_scale * x_b . t_k / T)``.

    Lower energy = more in-distribution. Features are used as given (normalize them first for
    CLIP). Differentiable twice w.r.t. both feature tensors; never stores the B x K logits.

    Args:
        image_features: ``[B, D]`` float32/float16/bfloat16/float64.
        text_features: ``[K, D]``, same dtype and device.
        logit_scale: CLIP's logit scale s (100 for trained CLIP models).
        temperature: T > 0.
    Returns:
        ``[B]`` tensor in the input dtype.

    Example::

        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        ood = -vlood_fast.energy_score(img, txt)   # higher = in-distribution
    """
    logit_scale = V.check_positive("logit_scale", logit_scale)
    temperature = V.check_positive("temperature", temperature)
    _check_pair(image_features, text_features)
    which = resolve_backend(image_features.device, image_features.dtype, backend)
    if which == "reference":
        return reference.energy_score(image_features, text_features, logit_scale, temperature)
    lse = similarity_logsumexp(image_features, text_features, logit_scale / temperature, backend=which)
    return (-temperature * lse).to(image_features.dtype)


def clip_cross_entropy(image_features, text_features, labels, logit_scale=100.0, reduction="mean",
                       *, backend=None):
    """Cross-entropy of CLIP logits, ``CE_b = logsumexp_k(s x_b . t_k) - s x_b . t_{y_b}``.

    Args:
        image_features: ``[B, D]`` float32/float16/bfloat16/float64.
        text_features: ``[K, D]``, same dtype and device.
        labels: integer ``[B]`` with values in ``[0, K)``.
        logit_scale: s.
        reduction: ``"mean" | "sum" | "none"`` (``"none"`` returns ``[B]``).
    Returns:
        scalar (or ``[B]``) in the input dtype; twice differentiable w.r.t. both features.

    Example::

        loss = vlood_fast.clip_cross_entropy(img, txt, labels)   # == F.cross_entropy(100 * img @ txt.T, labels)
        loss.backward()
    """
    logit_scale = V.check_positive("logit_scale", logit_scale)
    V.check_choice("reduction", reduction, ("mean", "sum", "none"))
    _check_pair(image_features, text_features)
    labels = V.check_labels(labels, image_features.shape[0], text_features.shape[0],
                            image_features.device)
    which = resolve_backend(image_features.device, image_features.dtype, backend)
    if which == "reference":
        return reference.clip_cross_entropy(image_features, text_features, labels, logit_scale, reduction)
    lse, target = _apply(image_features, text_features, labels, logit_scale, which)
    loss = lse - target
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(image_features.dtype)
