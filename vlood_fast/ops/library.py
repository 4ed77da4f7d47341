"""``torch.library`` custom ops: what ``torch.compile`` sees of vlood_fast's hot paths.

Eager calls go through the autograd Functions in ``similarity_lse`` and ``edr`` (twice
differentiable, all dispatch and validation). While ``torch.compile`` traces
(``torch.compiler.is_compiling()``), the public ops route here instead: opaque custom ops with
fake (meta) implementations for shape propagation, whose backward is another custom op, so a
module using ``energy_score``, ``clip_cross_entropy``, ``similarity_logsumexp``, ``ood_score``
and ``edr_penalty`` compiles with ``fullgraph=True`` and runs the same torch / triton code inside
the graph (``backend="reference"`` is plain PyTorch and is traced as such).

What is checked under compile: shapes, dtypes, devices and scalar arguments while tracing, as
eagerly. The checks that read tensor values (the label range, and the opt-in
``VLOOD_FAST_CHECK_FINITE=1`` finite check) would break the graph while tracing, so these ops run
them when the compiled graph runs, raising the same ``ValueError``; the reference backend skips
them under compile. Scalars (``logit_scale``, ``temperature``, ...) should be Python numbers:
a float that changes between calls is fine (dynamo specializes on it), a tensor is read with
``.item()`` and breaks the graph.

What differs under compile: gradients are first order only (the backward ops have no autograd
of their own; a double backward through a compiled graph raises instead of returning wrong
values). Gradients are computed only for inputs that need them, and every output is contiguous
(the fake implementations promise that layout; inductor checks it).

Adding an op: a forward op and its fake, a gradient op and its fake (one empty output per input
that needs no gradient), and ``register_autograd`` tying them; then route the public function
here under ``torch.compiler.is_compiling()`` and add a row to the tables of tests/test_compile.py.
"""
import torch

from .. import _validation as V
from . import edr as _edr
from . import similarity_lse as _lse


class _Ctx:
    """Stands in for autograd's ctx when an autograd Function's forward or backward runs inside
    a custom op: the op's own autograd (``register_autograd``) does the bookkeeping."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """The contiguous layout every fake implementation below promises."""
    return tensor.contiguous()


def _grad_or_empty(grad, like: torch.Tensor, needed: bool) -> torch.Tensor:
    """A gradient op's output: the gradient in ``like``'s dtype, or an empty tensor if not needed."""
    return _dense(grad.to(like.dtype)) if needed else like.new_empty(0)


def _fake_grad(like: torch.Tensor, needed: bool) -> torch.Tensor:
    return like.new_empty(like.shape if needed else (0,))


# ---------------------------------------------------------------- similarity + logsumexp
@torch.library.custom_op("vlood_fast::similarity_lse", mutates_args=())
def similarity_lse(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, scale: float,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse, target) as ``_SimilarityLSE``; runs the value checks tracing had to skip."""
    V.check_finite("image_features", x)
    V.check_finite("text_features", t)
    lse, _ = _lse._FORWARD[backend](x, t, scale, False)
    if labels is None:
        return _dense(lse), lse.new_empty(0)
    V.check_label_range(labels, t.shape[0])
    return _dense(lse), _dense(_lse._target_similarity(x, t, labels, scale, lse.dtype))


@similarity_lse.register_fake
def _(x, t, labels, scale, backend):
    acc = _lse._acc_dtype(x.dtype)
    return x.new_empty(x.shape[0], dtype=acc), x.new_empty(0 if labels is None else x.shape[0], dtype=acc)


@torch.library.custom_op("vlood_fast::similarity_lse_grad", mutates_args=())
def similarity_lse_grad(x: torch.Tensor, t: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                        h: torch.Tensor | None, labels: torch.Tensor | None, scale: float,
                        backend: str, need_x: bool, need_t: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dt) as ``_SimilarityLSEGrad``'s forward; an empty tensor for a gradient not needed."""
    g = g.to(lse.dtype)
    h = None if h is None else h.to(lse.dtype)
    dx, dt = _lse._GRAD[backend](x, t, lse, g, h, labels, scale, need_x, need_t, None)
    return _grad_or_empty(dx, x, need_x), _grad_or_empty(dt, t, need_t)


@similarity_lse_grad.register_fake
def _(x, t, lse, g, h, labels, scale, backend, need_x, need_t):
    return _fake_grad(x, need_x), _fake_grad(t, need_t)


def _lse_setup(ctx, inputs, output):
    x, t, labels, scale, backend = inputs
    ctx.save_for_backward(x, t, output[0], labels)
    ctx.scale, ctx.backend, ctx.has_labels = scale, backend, labels is not None


def _lse_backward(ctx, grad_lse, grad_target):
    x, t, lse, labels = ctx.saved_tensors
    need_x, need_t = ctx.needs_input_grad[:2]
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    h = None
    if ctx.has_labels:
        h = grad_target if grad_target is not None else torch.zeros_like(lse)
    dx, dt = similarity_lse_grad(x, t, lse, grad_lse, h, labels if ctx.has_labels else None,
                                 ctx.scale, ctx.backend, need_x, need_t)
    return dx if need_x else None, dt if need_t else None, None, None, None


similarity_lse.register_autograd(_lse_backward, setup_context=_lse_setup)


# ---------------------------------------------------------------- EDR penalty
@torch.library.custom_op("vlood_fast::edr_penalty", mutates_args=())
def edr_penalty(z: torch.Tensor, g: torch.Tensor, wi: torch.Tensor, wt: torch.Tensor, r: float,
                rt: float, inv_t: float, cphi: float, cr: float,
                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R, G, sum_k P v) from ``_EDRPenalty``'s forward: the last two are what the backward needs."""
    for name, tensor in (("z", z), ("text_features", g), ("image_weight", wi), ("text_weight", wt)):
        V.check_finite(name, tensor)
    ctx = _Ctx()
    R = _edr._EDRPenalty.forward(ctx, z, g, wi, wt, r, rt, inv_t, cphi, cr, backend)
    G, row = ctx.saved_tensors[4:6]  # the kept text rows, if any, are recomputed by the backward
    return R, _dense(G), _dense(row)


@edr_penalty.register_fake
def _(z, g, wi, wt, r, rt, inv_t, cphi, cr, backend):
    acc = _edr._acc_dtype(z.dtype)
    D = z.shape[1]
    return z.new_empty((), dtype=acc), z.new_empty(D, D, dtype=acc), z.new_empty(z.shape, dtype=acc)


@torch.library.custom_op("vlood_fast::edr_penalty_backward", mutates_args=())
def edr_penalty_backward(grad: torch.Tensor, z: torch.Tensor, g: torch.Tensor, wi: torch.Tensor,
                         wt: torch.Tensor, G: torch.Tensor, row: torch.Tensor, r: float, rt: float,
                         inv_t: float, cphi: float, cr: float, backend: str,
                         needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. (z, g, wi, wt) from ``_EDRPenalty.backward``, fed the state it saves
    (the adapted rows u, |a| are recomputed here: custom-op outputs stay R, G and the row sums)."""
    acc = G.dtype
    na, u, clamped = _edr._adapt(z.to(acc), _edr._Effective(wi.to(acc), r))
    ctx = _Ctx(saved_tensors=(z, g, wi, wt, G, row, u, na), consts=(r, rt, inv_t, cphi, cr, backend),
               needs_input_grad=tuple(needs), clamped=clamped)
    grads = _edr._EDRPenalty.backward(ctx, grad)[:4]
    return tuple(_grad_or_empty(d, like, need) for d, like, need in zip(grads, (z, g, wi, wt), needs))


@edr_penalty_backward.register_fake
def _(grad, z, g, wi, wt, G, row, r, rt, inv_t, cphi, cr, backend, needs):
    return tuple(_fake_grad(like, need) for like, need in zip((z, g, wi, wt), needs))


def _edr_setup(ctx, inputs, output):
    z, g, wi, wt, *consts = inputs
    ctx.save_for_backward(z, g, wi, wt, output[1], output[2])
    ctx.consts = consts


def _edr_backward(ctx, grad_r, grad_G, grad_row):
    z, g, wi, wt, G, row = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    if grad_r is None:
        grad_r = torch.zeros((), dtype=G.dtype, device=G.device)
    grads = edr_penalty_backward(grad_r, z, g, wi, wt, G, row, *ctx.consts, needs)
    return (*(d if need else None for d, need in zip(grads, needs)), None, None, None, None, None, None)


edr_penalty.register_autograd(_edr_backward, setup_context=_edr_setup)
