"""``torch.library`` custom ops: what ``torch.compile`` sees of vlood_fast's hot paths.

Eager calls go through the autograd Functions in ``similarity_lse`` and ``edr`` (twice
differentiable, all dispatch and validation). While ``torch.compile`` traces
(``torch.compiler.is_compiling()``), the public ops route here instead: opaque custom ops with
fake (meta) implementations for shape propagation, whose backward is another custom op, so a
module using ``energy_score``, ``clip_cross_entropy`` and ``edr_penalty`` compiles with
``fullgraph=True`` and runs the same torch / triton code inside the graph.

What differs under compile: gradients are first order only (no double backward through a
compiled graph), and data-dependent checks are skipped (the label range check would need a
device-to-host read, which breaks the graph); shapes, dtypes and devices are still checked.
"""
import torch

from . import edr as _edr
from . import similarity_lse as _lse


# ---------------------------------------------------------------- similarity + logsumexp
@torch.library.custom_op("vlood_fast::similarity_lse", mutates_args=())
def similarity_lse(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, scale: float,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    lse, _ = _lse._FORWARD[backend](x, t, scale, False)
    if labels is None:
        return lse, lse.new_empty(0)
    return lse, _lse._target_similarity(x, t, labels, scale, lse.dtype)


@similarity_lse.register_fake
def _(x, t, labels, scale, backend):
    acc = _lse._acc_dtype(x.dtype)
    return x.new_empty(x.shape[0], dtype=acc), x.new_empty(0 if labels is None else x.shape[0], dtype=acc)


@torch.library.custom_op("vlood_fast::similarity_lse_grad", mutates_args=())
def similarity_lse_grad(x: torch.Tensor, t: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                        h: torch.Tensor | None, labels: torch.Tensor | None, scale: float,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = g.to(lse.dtype)
    h = None if h is None else h.to(lse.dtype)
    dx, dt = _lse._GRAD[backend](x, t, lse, g, h, labels, scale, True, True, None)
    return dx.to(x.dtype), dt.to(t.dtype)


@similarity_lse_grad.register_fake
def _(x, t, lse, g, h, labels, scale, backend):
    return torch.empty_like(x), torch.empty_like(t)


def _lse_setup(ctx, inputs, output):
    x, t, labels, scale, backend = inputs
    ctx.save_for_backward(x, t, output[0], labels)
    ctx.scale, ctx.backend, ctx.has_labels = scale, backend, labels is not None


def _lse_backward(ctx, grad_lse, grad_target):
    x, t, lse, labels = ctx.saved_tensors
    h = grad_target if ctx.has_labels else None
    dx, dt = similarity_lse_grad(x, t, lse, grad_lse, h, labels if ctx.has_labels else None,
                                 ctx.scale, ctx.backend)
    return dx, dt, None, None, None


similarity_lse.register_autograd(_lse_backward, setup_context=_lse_setup)


# ---------------------------------------------------------------- EDR penalty
@torch.library.custom_op("vlood_fast::edr_penalty", mutates_args=())
def edr_penalty(z: torch.Tensor, g: torch.Tensor, wi: torch.Tensor, wt: torch.Tensor, r: float,
                rt: float, inv_t: float, cphi: float, cr: float,
                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R, G, sum_k P v): the last two are what the backward needs."""
    acc = _edr._acc_dtype(z.dtype)
    z32, g32 = z.to(acc), g.to(acc)
    wi_eff, wt_eff = _edr._effective(wi.to(acc), r), _edr._effective(wt.to(acc), rt)
    na, u, cu = _edr._adapt(z32, wi_eff)
    forward_fn = _edr._torch_forward if backend == "torch" else _edr._triton_forward
    row, g_text, _ = forward_fn(u, g32, wt_eff, inv_t, cphi, False)
    alpha = _edr._project(u, row, cu) * (cphi * inv_t / na)
    G = torch.addmm(g_text, alpha.t(), z32, beta=rt, alpha=r)
    R = (cr * torch.linalg.vector_norm(G, dtype=torch.float64).square()).to(acc)
    return R, G, row


@edr_penalty.register_fake
def _(z, g, wi, wt, r, rt, inv_t, cphi, cr, backend):
    acc = _edr._acc_dtype(z.dtype)
    D = z.shape[1]
    return z.new_empty((), dtype=acc), z.new_empty(D, D, dtype=acc), z.new_empty(z.shape, dtype=acc)


@torch.library.custom_op("vlood_fast::edr_penalty_backward", mutates_args=())
def edr_penalty_backward(grad: torch.Tensor, z: torch.Tensor, g: torch.Tensor, wi: torch.Tensor,
                         wt: torch.Tensor, G: torch.Tensor, row: torch.Tensor, r: float, rt: float,
                         inv_t: float, cphi: float, cr: float,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    class _Ctx:  # the eager backward, fed the saved state it expects
        saved_tensors = (z, g, wi, wt, G, row)
        consts = (r, rt, inv_t, cphi, cr, backend)
        needs_input_grad = (True, True, True, True)
    gz, gg, gwi, gwt = _edr._EDRPenalty.backward(_Ctx, grad)[:4]
    return gz, gg, gwi, gwt


@edr_penalty_backward.register_fake
def _(grad, z, g, wi, wt, G, row, r, rt, inv_t, cphi, cr, backend):
    return torch.empty_like(z), torch.empty_like(g), torch.empty_like(wi), torch.empty_like(wt)


def _edr_setup(ctx, inputs, output):
    z, g, wi, wt, *consts = inputs
    ctx.save_for_backward(z, g, wi, wt, output[1], output[2])
    ctx.consts = consts


def _edr_backward(ctx, grad_r, grad_G, grad_row):
    z, g, wi, wt, G, row = ctx.saved_tensors
    grads = edr_penalty_backward(grad_r, z, g, wi, wt, G, row, *ctx.consts)
    return (*grads, None, None, None, None, None, None)


edr_penalty.register_autograd(_edr_backward, setup_context=_edr_setup)
