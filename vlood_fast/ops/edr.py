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
KEEP_TEXT_ELEMENTS = 1 << 20  # keep v = normalize(g W_eff^T) for the backward up to 4 MB


def _chunk(rows, cols):
    return max(1, min(cols, CHUNK_ELEMENTS // max(rows, 1)))


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _adapt(x, weight_eff):
    """(|a| clamped, u = a / |a|, clamped-mask or None) for a = x W_eff^T."""
    return _normalize(torch.mm(x, weight_eff.t()))


def _normalize(a):
    norm = a.norm(dim=1, keepdim=True)
    clamped = norm <= EPS
    # None when no row is clamped (the common case): the masked branches are skipped
    clamped = clamped if (a.is_cuda or bool(clamped.any())) else None
    norm = norm.clamp_min(EPS)
    return norm, a / norm, clamped


def _effective(weight, ratio):
    """W_eff = r W + (1 - r) I, so that the adapter map is a = x W_eff^T."""
    eff = weight * ratio
    eff.diagonal().add_(1 - ratio)
    return eff


def _rowdot(x, w):
    return torch.linalg.vecdot(x, w, dim=1).unsqueeze(1)


def _project(x, w, clamped):
    """(I - x x^T) w per row; identity where the norm was clamped (then u = a / EPS is linear)."""
    projected = torch.addcmul(w, x, _rowdot(x, w), value=-1)
    return projected if clamped is None else torch.where(clamped, w, projected)


def _chain(x, norm, clamped, xdot, adot, g_x, g_xdot):
    """Back through xdot = (I - x x^T) adot / |a| and x = a / |a|: (grad a, grad adot)."""
    g_adot = _project(x, g_xdot, clamped).div_(norm)
    # xdot's dependence on x (through the projection) and on |a|
    through_x = torch.addcmul(g_xdot * _rowdot(x, adot), adot, _rowdot(x, g_xdot)).div_(norm)
    g_norm = _rowdot(g_xdot, xdot).div_(norm).neg_()
    if clamped is not None:
        through_x = torch.where(clamped, torch.zeros_like(through_x), through_x)
        g_norm = torch.where(clamped, torch.zeros_like(g_norm), g_norm)
    g_a = _project(x, g_x.sub_(through_x), clamped).div_(norm).addcmul_(g_norm, x)
    return g_a, g_adot


def _text_backward(v, ne, cv, vdot, edot, qu, pud, pu, inv_t, cphi, g_rows, wt_eff, H_t, need_g, need_wt):
    """Text side of the backward for some rows k: (grad g_k, ge^T g_k for grad W_t), each
    only if needed (text features are frozen in CRoFT: then neither GEMM runs for g).

    ``H_t = r_t H`` maps grad edot back to g, ``wt_eff`` maps grad e."""
    g_v = qu.add_(pud, alpha=cphi).mul_(inv_t)
    ge, gedot = _chain(v, ne, cv, vdot, edot, g_v, pu.mul_(cphi * inv_t))
    gg = torch.mm(ge, wt_eff).addmm_(gedot, H_t) if need_g else None
    return gg, torch.mm(ge.t(), g_rows) if need_wt else None


class _EDRPenalty(torch.autograd.Function):
    """Forward: R. Backward: closed form. Per K chunk the text side (e, v, their tangents and
    gradients) lives only inside the chunk, so nothing K x D is materialized on the torch path."""

    @staticmethod
    def forward(ctx, z, g, wi, wt, r, rt, inv_t, cphi, cr, backend):
        acc = _acc_dtype(z.dtype)
        z32, g32 = z.to(acc), g.to(acc)
        wi_eff, wt_eff = _effective(wi.to(acc), r), _effective(wt.to(acc), rt)
        na, u, cu = _adapt(z32, wi_eff)
        keep = g.shape[0] * g.shape[1] <= KEEP_TEXT_ELEMENTS
        forward_fn = _torch_forward if backend == "torch" else _triton_forward
        row, g_text, text_state = forward_fn(u, g32, wt_eff, inv_t, cphi, keep)
        alpha = _project(u, row, cu) * (cphi * inv_t / na)
        G = torch.addmm(g_text, alpha.t(), z32, beta=rt, alpha=r)
        ctx.save_for_backward(z, g, wi, wt, G, row, *text_state)
        ctx.consts = (r, rt, inv_t, cphi, cr, backend)
        # the norm is taken in fp64: |G|^2 can exceed fp32 at small temperatures
        return (cr * torch.linalg.vector_norm(G, dtype=torch.float64).square()).to(acc)

    @staticmethod
    def backward(ctx, grad_out):
        z, g, wi, wt, G, row, *text_state = ctx.saved_tensors
        r, rt, inv_t, cphi, cr, backend = ctx.consts
        acc = G.dtype
        z32, g32 = z.to(acc), g.to(acc)
        wi_eff, wt_eff = _effective(wi.to(acc), r), _effective(wt.to(acc), rt)
        na, u, cu = _adapt(z32, wi_eff)
        H = G * (2 * cr * grad_out.to(acc))
        adot = torch.mm(z32, H.t()).mul_(r)
        udot = _project(u, adot, cu) / na
        need = ctx.needs_input_grad
        pass_fn = _torch_backward if backend == "torch" else _triton_backward
        qv, pvd, gg, gwt = pass_fn(u, udot, g32, wt_eff, H, rt, inv_t, cphi, text_state,
                                   need[1], need[3])
        ga, gadot = _chain(u, na, cu, udot, adot, qv.add_(pvd, alpha=cphi).mul_(inv_t),
                           row * (cphi * inv_t))
        gz = gwi = None
        if need[0]:
            gz = torch.mm(ga, wi_eff).addmm_(gadot, H, alpha=r).to(z.dtype)
        if need[2]:
            gwi = torch.mm(ga.t(), z32).mul_(r).to(wi.dtype)
        return (gz, gg.to(g.dtype) if need[1] else None, None if not need[2] else gwi,
                gwt.mul_(rt).to(wt.dtype) if need[3] else None, None, None, None, None, None, None)


# ---------------------------------------------------------------- torch path: chunks over K
def _torch_forward(u, g, wt_eff, inv_t, cphi, keep=False):
    """(sum_k P_bk v_k [N, D], sum_k beta_k^T g_k [D, D], kept text state) over K chunks.

    With one chunk and ``keep``, the text rows v and norms |e| are kept for the backward (at
    most KEEP_TEXT_ELEMENTS floats), saving its recomputation of e = g W_eff^T."""
    us = u * inv_t
    row = torch.zeros_like(u)
    g_text = torch.zeros(u.shape[1], u.shape[1], dtype=u.dtype, device=u.device)
    step = _chunk(u.shape[0], g.shape[0])
    for k0 in range(0, g.shape[0], step):
        gc = g[k0:k0 + step]
        ne, v, cv = _adapt(gc, wt_eff)
        p = torch.mm(us, v.t()).exp_()
        row.addmm_(p, v)
        beta = _project(v, torch.mm(p.t(), u), cv).mul_(cphi * inv_t / ne)
        g_text.addmm_(beta.t(), gc)
    single = step >= g.shape[0]
    text_state = (v, ne) if keep and single and cv is None else ()
    return row, g_text, text_state


def _torch_backward(u, udot, g, wt_eff, H, rt, inv_t, cphi, text_state=(), need_g=True, need_wt=True):
    """Row sums (Q v, P vdot) [N, D], grad g [K, D] and grad W_t / r_t [D, D], chunked over K.

    Per chunk: [e | edot] = g [W_eff^T | r_t H^T], then P, Q = c_phi P m with
    m = [udot, u] . [v, vdot] / T, the column sums, and the text-side chain rule."""
    D = u.shape[1]
    us, uds = u * inv_t, udot * (inv_t * cphi)
    H_t = H * rt
    qv, pvd = torch.zeros_like(u), torch.zeros_like(u)
    gg = torch.empty_like(g) if need_g else None
    gwt = torch.zeros(D, D, dtype=u.dtype, device=u.device) if need_wt else None
    u_udot = torch.cat([u, udot], dim=1)                       # [N, 2D]
    step = _chunk(u.shape[0], g.shape[0])
    for k0 in range(0, g.shape[0], step):
        gc = g[k0:k0 + step]
        if text_state:
            (v, ne), cv = text_state, None
        else:
            ne, v, cv = _adapt(gc, wt_eff)
        edot = torch.mm(gc, H_t.t())
        vdot = _project(v, edot, cv).div_(ne)
        p = torch.mm(us, v.t()).exp_()
        q = torch.mm(uds, v.t()).addmm_(us, vdot.t(), alpha=cphi).mul_(p)   # c_phi P m
        qv.addmm_(q, v)
        pvd.addmm_(p, vdot)
        if not (need_g or need_wt):
            continue  # the column sums only feed the text side's gradients
        qu = torch.mm(q.t(), u)
        pu_pud = torch.mm(p.t(), u_udot)                       # [P^T u | P^T udot]
        if need_g or need_wt:
            gg_c, gwt_c = _text_backward(v, ne, cv, vdot, edot, qu, pu_pud[:, D:], pu_pud[:, :D],
                                         inv_t, cphi, gc, wt_eff, H_t, need_g, need_wt)
            if need_g:
                gg[k0:k0 + step] = gg_c
            if need_wt:
                gwt += gwt_c
    return qv, pvd, gg, gwt


# ---------------------------------------------------------------- triton path: two passes
def _triton_forward(u, g, wt_eff, inv_t, cphi, keep=False):
    from ..kernels import edr as kernels
    ne, v, cv = _adapt(g, wt_eff)
    row, col = kernels.edr_pass(u, v, inv_t), kernels.edr_pass(v, u, inv_t)
    beta = _project(v, col, cv) * (cphi * inv_t / ne)
    return row, torch.mm(beta.t(), g), ()


def _triton_backward(u, udot, g, wt_eff, H, rt, inv_t, cphi, text_state=(), need_g=True, need_wt=True):
    from ..kernels import edr as kernels
    ne, v, cv = _adapt(g, wt_eff)
    edot = torch.mm(g, H.t()).mul_(rt)
    vdot = (_project(v, edot, cv) / ne).contiguous()
    qv, pvd, _ = kernels.edr_pass(u, v, inv_t, own_dot=udot.contiguous(), other_dot=vdot, cphi=cphi)
    qu, pud, pu = kernels.edr_pass(v, u, inv_t, own_dot=vdot, other_dot=udot.contiguous(), cphi=cphi)
    gg, gwt = _text_backward(v, ne, cv, vdot, edot, qu, pud, pu, inv_t, cphi, g, wt_eff, H * rt,
                             need_g, need_wt)
    return qv, pvd, gg, gwt


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
    args = (z, text_features, image_weight, text_weight, float(ratio), float(ratio_text),
            1.0 / temperature, cphi, cr, which)
    if torch.compiler.is_compiling():  # opaque custom op for torch.compile (ops/library.py)
        return torch.ops.vlood_fast.edr_penalty(*args)[0].to(z.dtype)
    return _EDRPenalty.apply(*args).to(z.dtype)
