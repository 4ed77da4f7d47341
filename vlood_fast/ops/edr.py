"""The EDR energy-gradient penalty of CRoFT in closed form: no double backward.

With adapted, normalized rows ``u_b`` (image side, from z) and ``v_k`` (text side, from g),
``P_bk = exp(u_b . v_k / T)`` and ``Phi = c_phi sum P``, the gradient of Phi w.r.t. one D x D
perturbation added to both adapter weights is (DESIGN.md section 2)

    G = r A^T Z + r_t B^T Gmat,  alpha_b = (c_phi/T) (I - u u^T) (sum_k P_bk v_k) / |a_b|,
                                 beta_k  = (c_phi/T) (I - v v^T) (sum_b P_bk u_b) / |e_k|,

and ``R = c_R ||G||^2``. For the backward, ``dR = <H, dG>`` with ``H = 2 c_R G`` held fixed,
which is the gradient of the first-order scalar ``psi = c_phi sum_bk P_bk m_bk`` where
``m_bk = (udot_b . v_k + u_b . vdot_k) / T`` is the derivative of u.v/T along the tangent
``adot = r z H^T``, ``edot = r_t g H^T``. Differentiating psi by hand gives, per K chunk,
``Q = c_phi P * m`` and six "attention-like" sums: rows ``Q v``, ``P vdot`` and columns
``Q^T u``, ``P^T udot``, ``P^T u``; the rest is the chain rule through the normalizations and
the linear maps (D x D GEMMs). Nothing N x K outlives a chunk; the forward saves G and
``sum_k P v`` (N x D).

Zero rows: norms are clamped at ``EPS`` exactly like ``F.normalize`` (the reference), so a zero
feature row gives u = 0, a finite penalty and finite gradients.
"""
import torch

from .. import _validation as V
from ..dispatch import resolve_backend
from ..reference import edr as reference

EPS = 1e-12                 # F.normalize's epsilon: what the reference uses
MAX_INV_TEMPERATURE = 40.0  # exp(u.v / T) <= exp(40) keeps every sum finite in fp32
CHUNK_ELEMENTS = 1 << 20


def _chunk(rows, cols):
    return max(1, min(cols, CHUNK_ELEMENTS // max(rows, 1)))


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _adapt(x, weight, ratio):
    """(a, |a| clamped, u = a / |a|, clamped-mask) for a = ratio x W^T + (1 - ratio) x."""
    a = torch.addmm(x, x, weight.t(), beta=1 - ratio, alpha=ratio)
    norm = a.norm(dim=1, keepdim=True)
    clamped = norm <= EPS
    norm = norm.clamp_min(EPS)
    return a, norm, a / norm, clamped


def _project(x, w, clamped):
    """(I - x x^T) w per row; identity where the norm was clamped (then u = a / EPS is linear)."""
    return torch.where(clamped, w, w - x * (x * w).sum(dim=1, keepdim=True))


# ---------------------------------------------------------------- torch passes (chunked over K)
def _torch_forward_sums(u, v, inv_t):
    """(sum_k P_bk v_k [N, D], sum_b P_bk u_b [K, D]) in one sweep over K chunks."""
    us = u * inv_t
    row = torch.zeros_like(u)
    col = torch.empty_like(v)
    step = _chunk(u.shape[0], v.shape[0])
    for k0 in range(0, v.shape[0], step):
        vc = v[k0:k0 + step]
        p = torch.mm(us, vc.t()).exp_()
        row.addmm_(p, vc)
        torch.mm(p.t(), u, out=col[k0:k0 + step])
    return row, col


def _torch_backward_sums(u, udot, v, vdot, inv_t, cphi):
    """Rows (Q v, P vdot) [N, D] and columns (Q^T u, P^T udot, P^T u) [K, D], Q = c_phi P m."""
    us, uds = u * inv_t, udot * inv_t
    left = torch.cat([uds, us], dim=1)                   # m = [udot, u] . [v, vdot] / T
    qv, pvd = torch.zeros_like(u), torch.zeros_like(u)
    qu, pud, pu = torch.empty_like(v), torch.empty_like(v), torch.empty_like(v)
    step = _chunk(u.shape[0], v.shape[0])
    for k0 in range(0, v.shape[0], step):
        sl = slice(k0, k0 + step)
        vc, vdc = v[sl], vdot[sl]
        p = torch.mm(us, vc.t()).exp_()
        q = torch.mm(left, torch.cat([vc, vdc], dim=1).t()).mul_(p).mul_(cphi)
        qv.addmm_(q, vc)
        pvd.addmm_(p, vdc)
        torch.mm(q.t(), u, out=qu[sl])
        torch.mm(p.t(), udot, out=pud[sl])
        torch.mm(p.t(), u, out=pu[sl])
    return qv, pvd, qu, pud, pu


# ---------------------------------------------------------------- triton passes
def _triton_forward_sums(u, v, inv_t):
    from ..kernels import edr as kernels
    return kernels.edr_pass(u, v, inv_t), kernels.edr_pass(v, u, inv_t)


def _triton_backward_sums(u, udot, v, vdot, inv_t, cphi):
    from ..kernels import edr as kernels
    qv, pvd, _ = kernels.edr_pass(u, v, inv_t, own_dot=udot, other_dot=vdot, cphi=cphi)
    qu, pud, pu = kernels.edr_pass(v, u, inv_t, own_dot=vdot, other_dot=udot, cphi=cphi)
    return qv, pvd, qu, pud, pu


_FORWARD = {"torch": _torch_forward_sums, "triton": _triton_forward_sums}
_BACKWARD = {"torch": _torch_backward_sums, "triton": _triton_backward_sums}


def _alpha(x, row_sum, norm, clamped, scale):
    return _project(x, row_sum, clamped) * (scale / norm)


class _EDRPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, g, wi, wt, r, rt, inv_t, cphi, cr, backend):
        acc = _acc_dtype(z.dtype)
        z32, g32, wi32, wt32 = (t.to(acc) for t in (z, g, wi, wt))
        _, na, u, cu = _adapt(z32, wi32, r)
        _, ne, v, cv = _adapt(g32, wt32, rt)
        row, col = _FORWARD[backend](u, v, inv_t)
        alpha = _alpha(u, row, na, cu, cphi * inv_t)
        beta = _alpha(v, col, ne, cv, cphi * inv_t)
        G = torch.mm(alpha.t(), z32).mul_(r).addmm_(beta.t(), g32, alpha=rt)
        ctx.save_for_backward(z, g, wi, wt, G, row)
        ctx.consts = (r, rt, inv_t, cphi, cr, backend)
        # the square is summed in fp64: |G|^2 can exceed fp32 at small temperatures
        return (cr * G.double().square().sum()).to(acc)

    @staticmethod
    def backward(ctx, grad_out):
        z, g, wi, wt, G, row = ctx.saved_tensors
        r, rt, inv_t, cphi, cr, backend = ctx.consts
        acc = G.dtype
        z32, g32, wi32, wt32 = (t.to(acc) for t in (z, g, wi, wt))
        _, na, u, cu = _adapt(z32, wi32, r)
        _, ne, v, cv = _adapt(g32, wt32, rt)
        H = G * (2 * cr * grad_out.to(acc))
        adot = torch.mm(z32, H.t()).mul_(r)
        edot = torch.mm(g32, H.t()).mul_(rt)
        udot = _project(u, adot, cu) / na
        vdot = _project(v, edot, cv) / ne
        qv, pvd, qu, pud, pu = _BACKWARD[backend](u, udot, v, vdot, inv_t, cphi)
        ga, gadot = _chain(u, na, cu, udot, adot, (qv + cphi * pvd) * inv_t, row * (cphi * inv_t))
        ge, gedot = _chain(v, ne, cv, vdot, edot, (qu + cphi * pud) * inv_t, pu * (cphi * inv_t))
        need = ctx.needs_input_grad
        gz = gg = gwi = gwt = None
        if need[0]:
            gz = (torch.mm(ga, wi32).mul_(r).add_(ga, alpha=1 - r)
                  .addmm_(gadot, H, alpha=r)).to(z.dtype)
        if need[1]:
            gg = (torch.mm(ge, wt32).mul_(rt).add_(ge, alpha=1 - rt)
                  .addmm_(gedot, H, alpha=rt)).to(g.dtype)
        if need[2]:
            gwi = torch.mm(ga.t(), z32).mul_(r).to(wi.dtype)
        if need[3]:
            gwt = torch.mm(ge.t(), g32).mul_(rt).to(wt.dtype)
        return gz, gg, gwi, gwt, None, None, None, None, None, None


def _chain(x, norm, clamped, xdot, adot, g_x, g_xdot):
    """Back through xdot = (I - x x^T) adot / |a| and x = a / |a|: (grad a, grad adot)."""
    g_adot = _project(x, g_xdot, clamped) / norm
    # xdot's dependence on x (the projection) and on |a|
    x_adot = (x * adot).sum(dim=1, keepdim=True)
    x_gdot = (x * g_xdot).sum(dim=1, keepdim=True)
    g_x_total = g_x - torch.where(clamped, torch.zeros_like(g_x), (g_xdot * x_adot + adot * x_gdot) / norm)
    g_norm = -(g_xdot * xdot).sum(dim=1, keepdim=True) / norm
    g_a = _project(x, g_x_total, clamped) / norm + torch.where(clamped, torch.zeros_like(x), g_norm * x)
    return g_a, g_adot


PRESETS = {"setup1": dict(potential="sum", penalty="mean"),   # ImageNet protocol
           "setup2": dict(potential="mean", penalty="sum")}   # PACS / VLCS protocol


def edr_penalty(z, text_features, image_weight, text_weight, ratio=0.2, ratio_text=0.5,
                temperature=1.0, potential="sum", penalty="mean", *, backend=None):
    """CRoFT's EDR penalty ``c_R ||d Phi / d W||^2`` in closed form (no double backward).

    ``a = r z W_i^T + (1-r) z``, ``e = r_t g W_t^T + (1-r_t) g``, ``u, v`` their normalized rows,
    ``Phi = c_phi sum_bk exp(u_b . v_k / T)``; G is the gradient of Phi w.r.t. one D x D
    perturbation added to both weights. Gradients flow to every input that requires grad.

    Args:
        z: ``[N, D]`` image-side rows (zero-shot features, and the shifted rows in WCCF mode).
        text_features: ``[K, D]`` normalized text rows g.
        image_weight, text_weight: ``[D, D]`` adapter weights (``nn.Linear`` convention ``x @ W.T``).
        ratio, ratio_text: residual ratios r, r_t in [0, 1].
        temperature: T > 0 with 1/T <= 40.
        potential: ``"sum"`` (c_phi = 1) or ``"mean"`` (c_phi = 1/(N K)).
        penalty: ``"mean"`` (c_R = 1/D^2) or ``"sum"`` (c_R = 1).
        backend: ``"reference" | "torch" | "triton"`` (default by device).
    Returns:
        scalar in z's dtype (float32/float16/bfloat16/float64; fp32 accumulation).

    Example::

        adapter = CroftAdapter(512)
        R = edr_penalty(torch.cat([feats, shifted]), text, adapter.image_weight, adapter.text_weight)
        (loss + 5.0 * R).backward()
    """
    V.check_matrix("z", z, "[N, D]")
    V.check_matrix("text_features", text_features, "[K, D]")
    D = z.shape[1]
    V.check_same_dim("z", z, "text_features", text_features)
    for name, w in (("image_weight", image_weight), ("text_weight", text_weight)):
        V.check_matrix(name, w, f"[{D}, {D}]")
        if w.shape != (D, D):
            raise ValueError(f"{name} must have shape [{D}, {D}] (D from z), got {tuple(w.shape)}")
    V.check_compatible(z=z, text_features=text_features, image_weight=image_weight,
                       text_weight=text_weight)
    for name, value in (("ratio", ratio), ("ratio_text", ratio_text)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    temperature = V.check_positive("temperature", temperature)
    if 1.0 / temperature > MAX_INV_TEMPERATURE:
        raise ValueError(f"1/temperature must be <= {MAX_INV_TEMPERATURE:g} (exp(u.v/T) would "
                         f"overflow fp32), got temperature={temperature}")
    V.check_choice("potential", potential, ("sum", "mean"))
    V.check_choice("penalty", penalty, ("mean", "sum"))
    which = resolve_backend(z.device, z.dtype, backend)
    if which == "reference":
        return reference.edr_penalty(z, text_features, image_weight, text_weight, ratio, ratio_text,
                                     temperature, potential, penalty)
    N, K = z.shape[0], text_features.shape[0]
    cphi = 1.0 / (N * K) if potential == "mean" else 1.0
    cr = 1.0 / D ** 2 if penalty == "mean" else 1.0
    out = _EDRPenalty.apply(z, text_features, image_weight, text_weight, float(ratio),
                            float(ratio_text), 1.0 / temperature, cphi, cr, which)
    return out.to(z.dtype)
