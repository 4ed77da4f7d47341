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
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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
    return _normalize(weight_eff(x))


def _normalize(a):
    norm = a.norm(dim=1, keepdim=True)
    clamped = norm <= EPS
    # None when no row is clamped (the common case): the masked branches are skipped
    clamped = clamped if (a.is_cuda or bool(clamped.any())) else None
    norm = norm.clamp_min(EPS)
    return norm, a / norm, clamped


class _Effective:
    """The adapter map W_eff = r W + (1 - r) I, applied without building W_eff: each product is
    one addmm (``r x W^T + (1 - r) x``), so no D x D temporary is written per call."""

    def __init__(self, weight, ratio):
        self.weight, self.ratio = weight, ratio

    def __call__(self, x):
        """x W_eff^T."""
        return torch.addmm(x, x, self.weight.t(), beta=1 - self.ratio, alpha=self.ratio)

    def transposed(self, y):
        """y W_eff."""
        return torch.addmm(y, y, self.weight, beta=1 - self.ratio, alpha=self.ratio)


def _constants(N, K, D, temperature, potential, penalty):
    """Validated (1/T, c_phi, c_R) for N image rows, K text rows and dim D (DESIGN.md section 2).
    1/T above MAX_INV_TEMPERATURE is rejected: exp(u.v / T) would overflow fp32."""
    temperature = V.check_positive("temperature", temperature)
    if 1.0 / temperature > MAX_INV_TEMPERATURE:
        raise ValueError(f"1/temperature must be <= {MAX_INV_TEMPERATURE:g} (exp(u.v/T) would "
                         f"overflow fp32), got temperature={temperature}")
    V.check_choice("potential", potential, ("sum", "mean"))
    V.check_choice("penalty", penalty, ("mean", "sum"))
    cphi = 1.0 / (N * K) if potential == "mean" else 1.0
    cr = 1.0 / D ** 2 if penalty == "mean" else 1.0
    return 1.0 / temperature, cphi, cr


def _penalty(G, cr):
    """``c_R ||G||^2`` in G's dtype. The sum of squares can exceed fp32 at small temperatures
    while R does not: then (and always on GPU, where it is cheap) it is taken in fp64."""
    if G.dtype == torch.float32 and not G.is_cuda:
        norm = torch.linalg.vector_norm(G)
        if bool(torch.isfinite(norm)):
            return (cr * norm.double().square()).to(G.dtype)
    return (cr * torch.linalg.vector_norm(G, dtype=torch.float64).square()).to(G.dtype)


def _scaled_mm(a, b, alpha):
    """alpha * a @ b with the scale applied inside the GEMM (no pass over the output)."""
    return torch.addmm(a.new_zeros(()), a, b, beta=0, alpha=alpha)


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


def _text_rows(g_rows, wt_eff, e_rows):
    """(|e| clamped, v, clamped-mask) for some text rows: from the given adapted rows e, or
    e = g W_eff^T when none are given."""
    return _normalize(e_rows) if e_rows is not None else _adapt(g_rows, wt_eff)


def _text_backward(v, ne, cv, vdot, edot, qu, pud, pu, inv_t, cphi):
    """Text side of the backward for some rows k: (grad e_k, grad edot_k)."""
    g_v = qu.add_(pud, alpha=cphi).mul_(inv_t)
    return _chain(v, ne, cv, vdot, edot, g_v, pu.mul_(cphi * inv_t))


def _text_grads(ge, gedot, g_rows, wt_eff, H_t, need_g, need_wt):
    """(grad g_k, ge^T g_k for grad W_t / r_t) from (grad e, grad edot), each only if needed.

    With ``wt_eff=None`` (the adapted rows e were given) grad g is only edot's direct part
    ``gedot r_t H`` and the second slot returns grad e itself."""
    if wt_eff is None:
        return (torch.mm(gedot, H_t) if need_g else None), (ge if need_wt else None)
    gg = wt_eff.transposed(ge).addmm_(gedot, H_t) if need_g else None
    return gg, torch.mm(ge.t(), g_rows) if need_wt else None


def _forward_sums(u, na, cu, z32, g32, wt_eff, e32, r, rt, inv_t, cphi, backend):
    """(G, sum_k P v [N, D], kept text state) from the adapted image rows u (norms na, mask cu)
    and the text side: e = g W_eff^T made here, or the given adapted rows e32 (wt_eff=None)."""
    keep = g32.shape[0] * g32.shape[1] <= KEEP_TEXT_ELEMENTS
    forward_fn = _torch_forward if backend == "torch" else _triton_forward
    row, g_text, text_state = forward_fn(u, g32, wt_eff, inv_t, cphi, keep, e=e32)
    alpha = _project(u, row, cu) * (cphi * inv_t / na)
    return torch.addmm(g_text, alpha.t(), z32, beta=rt, alpha=r), row, text_state


def _backward_sums(adapted, z32, g32, wt_eff, e32, G, row, text_state, grad_out, consts, need_g, need_wt):
    """The backward's shared part: H = 2 c_R G grad_out, the tangent adot = r z H^T, the row and
    column passes, and the chain rule through u = a / |a|. Returns (H, grad a, grad adot, the
    text side's grad g, and grad W_t / r_t, or grad e when e32 is given)."""
    (na, u, cu), (r, rt, inv_t, cphi, cr, backend) = adapted, consts
    H = G * (2 * cr * grad_out.to(G.dtype))
    adot = torch.mm(z32, H.t()).mul_(r)
    udot = _project(u, adot, cu) / na
    pass_fn = _torch_backward if backend == "torch" else _triton_backward
    qv, pvd, gg, gwt = pass_fn(u, udot, g32, wt_eff, H, rt, inv_t, cphi, text_state, need_g, need_wt,
                               e=e32)
    ga, gadot = _chain(u, na, cu, udot, adot, qv.add_(pvd, alpha=cphi).mul_(inv_t), row * (cphi * inv_t))
    return H, ga, gadot, gg, gwt


class _EDRPenalty(torch.autograd.Function):
    """Forward: R. Backward: closed form. Per K chunk the text side (e, v, their tangents and
    gradients) lives only inside the chunk, so nothing K x D is materialized on the torch path."""

    @staticmethod
    def forward(ctx, z, g, wi, wt, r, rt, inv_t, cphi, cr, backend):
        acc = _acc_dtype(z.dtype)
        z32, g32 = z.to(acc), g.to(acc)
        wi_eff, wt_eff = _Effective(wi.to(acc), r), _Effective(wt.to(acc), rt)
        na, u, cu = _adapt(z32, wi_eff)
        G, row, text_state = _forward_sums(u, na, cu, z32, g32, wt_eff, None, r, rt, inv_t, cphi, backend)
        # u and |a| ([N, D] + [N]) are kept: recomputing them costs an N x D x D product
        ctx.save_for_backward(z, g, wi, wt, G, row, u, na, *text_state)
        ctx.clamped = cu
        ctx.consts = (r, rt, inv_t, cphi, cr, backend)
        # the norm is taken in fp64: |G|^2 can exceed fp32 at small temperatures
        return _penalty(G, cr)

    @staticmethod
    def backward(ctx, grad_out):
        z, g, wi, wt, G, row, u, na, *text_state = ctx.saved_tensors
        r, rt = ctx.consts[:2]
        acc = G.dtype
        z32, g32 = z.to(acc), g.to(acc)
        wi_eff, wt_eff = _Effective(wi.to(acc), r), _Effective(wt.to(acc), rt)
        need = ctx.needs_input_grad
        H, ga, gadot, gg, gwt = _backward_sums((na, u, ctx.clamped), z32, g32, wt_eff, None, G, row,
                                               text_state, grad_out, ctx.consts, need[1], need[3])
        gz = gwi = None
        if need[0]:
            gz = wi_eff.transposed(ga).addmm_(gadot, H, alpha=r).to(z.dtype)
        if need[2]:
            gwi = _scaled_mm(ga.t(), z32, r).to(wi.dtype)
        return (gz, gg.to(g.dtype) if need[1] else None, None if not need[2] else gwi,
                gwt.mul_(rt).to(wt.dtype) if need[3] else None, None, None, None, None, None, None)


class _EDRFromAdapted(torch.autograd.Function):
    """R from the adapted rows ``a = z W_i_eff^T`` [N, D] and ``e = g W_t_eff^T`` [K, D] that
    the caller already holds (CroftLoss: the cross-entropies use the same rows).

    Same algorithm as ``_EDRPenalty``; the gradients returned are w.r.t. a and e (autograd takes
    them through the caller's linear maps, so the W_t gradient GEMM is shared with the
    cross-entropies) and the direct parts w.r.t. z and g (``G = r A^T z + r_t B^T g``)."""

    @staticmethod
    def forward(ctx, a, e, z, g, r, rt, inv_t, cphi, cr, backend):
        acc = _acc_dtype(a.dtype)
        a32, e32, z32, g32 = (t.to(acc) for t in (a, e, z, g))
        na, u, cu = _normalize(a32)
        G, row, text_state = _forward_sums(u, na, cu, z32, g32, None, e32, r, rt, inv_t, cphi, backend)
        ctx.save_for_backward(a, e, z, g, G, row, *text_state)
        ctx.consts = (r, rt, inv_t, cphi, cr, backend)
        return _penalty(G, cr)

    @staticmethod
    def backward(ctx, grad_out):
        a, e, z, g, G, row, *text_state = ctx.saved_tensors
        r = ctx.consts[0]
        acc = G.dtype
        a32, e32, z32, g32 = (t.to(acc) for t in (a, e, z, g))
        need_a, need_e, need_z, need_g = ctx.needs_input_grad[:4]
        H, ga, gadot, gg, ge = _backward_sums(_normalize(a32), z32, g32, None, e32, G, row, text_state,
                                              grad_out, ctx.consts, need_g, need_e)
        gz = torch.mm(gadot, H).mul_(r).to(z.dtype) if need_z else None
        return (ga.to(a.dtype) if need_a else None, ge.to(e.dtype) if need_e else None, gz,
                gg.to(g.dtype) if need_g else None, None, None, None, None, None, None)


def edr_penalty_adapted(a, e, z, g, ratio=0.2, ratio_text=0.5, temperature=1.0, potential="sum",
                        penalty="mean", *, backend=None):
    """``edr_penalty`` from precomputed adapted rows (internal; used by ``CroftLoss``).

    ``a = r z W_i^T + (1-r) z`` [N, D] and ``e = r_t g W_t^T + (1-r_t) g`` [K, D] (unnormalized),
    with the z [N, D] and g [K, D] they were made from; gradients reach the weights through a
    and e. Same value as ``edr_penalty(z, g, W_i, W_t, ...)``."""
    for name, t, dims in (("a", a, "[N, D]"), ("e", e, "[K, D]"), ("z", z, "[N, D]"),
                          ("text_features", g, "[K, D]")):
        V.check_matrix(name, t, dims)
    if a.shape != z.shape or e.shape != g.shape or a.shape[1] != e.shape[1]:
        raise ValueError(f"a {tuple(a.shape)} must match z {tuple(z.shape)} and e {tuple(e.shape)} "
                         f"must match text_features {tuple(g.shape)}, all with one D")
    V.check_compatible(a=a, e=e, z=z, text_features=g)
    inv_t, cphi, cr = _constants(z.shape[0], g.shape[0], z.shape[1], temperature, potential, penalty)
    which = resolve_backend(z.device, z.dtype, backend)
    if which == "reference":
        raise ValueError("edr_penalty_adapted has no reference backend; use edr_penalty")
    return _EDRFromAdapted.apply(a, e, z, g, float(ratio), float(ratio_text), inv_t, cphi, cr,
                                 which).to(z.dtype)


class _AdapterMap(torch.autograd.Function):
    """``a = r x W^T + (1 - r) x`` (one addmm, ``_Effective``). Its backward returns the weight
    gradient as a fresh dense tensor scaled inside its GEMM (not a view), so autograd adds the
    gradients of two uses of one weight in place: no extra [D, D] temporaries per step."""

    @staticmethod
    def forward(ctx, x, weight, ratio):
        ctx.save_for_backward(x, weight)
        ctx.ratio = ratio
        return _Effective(weight.to(x.dtype), ratio)(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        r = ctx.ratio
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = _Effective(weight.to(grad.dtype), r).transposed(grad)
        if ctx.needs_input_grad[1]:
            gw = _scaled_mm(grad.t(), x, r).to(weight.dtype)
        return gx, gw, None


def adapter_map(x, weight, ratio):
    """``r x W^T + (1 - r) x`` for ``x`` [N, D], ``weight`` [D, D] (internal: CroftAdapter's map)."""
    return _AdapterMap.apply(x, weight, float(ratio))


class _CroftTerms(torch.autograd.Function):
    """CRoFT's cross-entropy rows and EDR penalty from ONE set of adapted rows (torch path).

    ``CE_b = logsumexp_k(s u_b . v_k) - s u_b . v_{y_b}`` and R share every N x K product: per K
    chunk one GEMM gives ``S = u v^T``, from which come the EDR's ``P = exp(S / T)`` and the
    CE's logits ``s S``. In the backward the CE's softmax weights join the EDR's weights,
    ``W1 = c_phi P (udot v^T + u vdot^T) / T^2 + s g_ce (softmax - onehot)``, so one row GEMM
    and one column GEMM serve both losses, and both gradients share one chain rule per
    normalization. The text side works on the unnormalized rows e: ``v = e / |e|`` and its
    tangent are never materialized (their per-row scalings are folded into the N x K weights
    and into in-place updates of the one [K, D] gradient buffer), and H = 2 c_R G only as a
    scalar on thin operands. With one chunk (N K <= CHUNK_ELEMENTS) and a small vocabulary,
    S, |e| and ``P^T u`` are kept for the backward instead of recomputed."""

    @staticmethod
    def forward(ctx, a, e, z, g, labels, s, r, rt, inv_t, cphi, cr):
        acc = _acc_dtype(a.dtype)
        a32, e32, z32, g32 = (t.to(acc) for t in (a, e, z, g))
        N, K = a.shape[0], e.shape[0]
        na, u, cu = _normalize(a32)
        c0 = cphi * inv_t
        step = _chunk(N, K)
        keep = step >= K and K * e.shape[1] <= KEEP_TEXT_ELEMENTS
        row, G, lse, kept = torch.zeros_like(u), None, None, ()
        target = u.new_zeros(N)
        for k0 in range(0, K, step):
            k1 = min(K, k0 + step)
            ec, gc = e32[k0:k1], g32[k0:k1]
            ine, radial = _inverse_norms(ec)                        # [K, 1] columns
            S = torch.mm(u, ec.t()).mul_(ine.t())                   # u . v
            p = torch.mul(S, inv_t).exp_()
            chunk_lse = torch.logsumexp(S * s, dim=1)
            lse = chunk_lse if lse is None else torch.logaddexp(lse, chunk_lse)
            inside = (labels >= k0) & (labels < k1)
            hit = S.gather(1, (labels - k0).clamp_(0, k1 - k0 - 1).unsqueeze(1)).squeeze(1)
            target += torch.where(inside, hit, 0.0)
            row.addmm_(p * ine.t(), ec)                             # P v
            X = torch.mm(p.t(), u)                                  # P^T u
            eX = _rowdot(ec, X).mul_(radial)
            # beta = c0 (I - v v^T) X / |e|
            beta = torch.mul(X, ine * c0).addcmul_(ec, eX * ine ** 3, value=-c0)
            G = torch.mm(beta.t(), gc) if G is None else G.addmm_(beta.t(), gc)
            if keep:
                kept = (S, ine, radial, X, eX)
        alpha = _project(u, row, cu) * (c0 / na)
        G.addmm_(alpha.t(), z32, beta=rt, alpha=r)          # G = r A^T z + r_t B^T g
        ctx.save_for_backward(a, e, z, g, labels, G, row, lse, *kept)
        ctx.consts = (s, r, rt, inv_t, cphi, cr)
        R = _penalty(G, cr)
        return lse - s * target, R

    @staticmethod
    @once_differentiable
    def backward(ctx, g_ce, g_R):
        a, e, z, g, labels, G, row, lse, *kept = ctx.saved_tensors
        s, r, rt, inv_t, cphi, cr = ctx.consts
        acc = G.dtype
        a32, e32, z32, g32 = (t.to(acc) for t in (a, e, z, g))
        N, K = a.shape[0], e.shape[0]
        need_a, need_e, need_z, need_g = ctx.needs_input_grad[:4]
        c0 = cphi * inv_t
        na, u, cu = _normalize(a32)
        h = (2 * cr) * (g_R.to(acc) if g_R is not None else torch.zeros((), dtype=acc))  # H = h G
        adot = torch.mm(z32, G.t()).mul_(h * r)
        udot = _project(u, adot, cu) / na
        gs = g_ce.to(acc) * s if g_ce is not None else None
        gu = torch.zeros_like(u)
        ge = torch.empty_like(e32) if need_e else None
        gg = torch.empty_like(g32) if need_g else None
        step = _chunk(N, K)
        for k0 in range(0, K, step):
            k1 = min(K, k0 + step)
            ec, gc = e32[k0:k1], g32[k0:k1]
            if kept:
                S, ine, radial, X, eX = kept
            else:
                ine, radial = _inverse_norms(ec)
                S, X = torch.mm(u, ec.t()).mul_(ine.t()), None
            edot = torch.mm(gc, G.t()).mul_(h * rt)                 # tangent of e
            ve = _rowdot(ec, edot).mul_(radial).mul_(ine)           # v . edot  [K, 1]
            p = torch.mul(S, inv_t).exp_()
            if X is None and (need_e or need_g):
                X = torch.mm(p.t(), u)
                eX = _rowdot(ec, X).mul_(radial)
            # m = udot . v + u . vdot, vdot = (edot - v (v . edot)) / |e|
            m = torch.mm(udot, ec.t()).addmm_(u, edot.t()).mul_(ine.t()).sub_(S * (ve * ine).t())
            w1 = m.mul_(p).mul_(c0 * inv_t)
            if gs is not None:  # + s g_ce (softmax - onehot)
                w1.addcmul_(torch.mul(S, s).sub_(lse[:, None]).exp_(), gs[:, None])
                hits = ((labels >= k0) & (labels < k1)).nonzero().squeeze(1)
                w1.index_put_((hits, labels[hits] - k0), -gs[hits], accumulate=True)
            w2 = p.mul_(c0)
            # grad u = W1 v + W2 vdot, with v and vdot written through e and edot
            gu.addmm_(w1 * ine.t() - w2 * (ve * ine * ine).t(), ec).addmm_(w2 * ine.t(), edot)
            if need_e or need_g:
                # grad v = W1^T u + W2^T udot; grad vdot = c0 X; then back through both
                # normalizations to e, in place in the [K, D] gradient rows
                gv = torch.mm(w1.t(), u, out=ge[k0:k1]) if need_e else torch.mm(w1.t(), u)
                gv.addmm_(w2.t(), udot)
                if need_g:
                    gg[k0:k1] = torch.mm(torch.mul(X, ine * c0).addcmul_(ec, eX * ine ** 3, value=-c0),
                                         G).mul_(h * rt)
                if need_e:
                    # -(c0 X . vdot) / |e|
                    g_norm = (_rowdot(X, edot) * ine - eX * ve * ine * ine).mul_(-c0 * ine)
                    gv.addcmul_(X, ve * ine, value=-c0).addcmul_(edot, eX * ine * ine, value=-c0)
                    vt = _rowdot(ec, gv).mul_(ine)
                    gv.mul_(ine).addcmul_(ec, (g_norm - vt * ine).mul_(radial).mul_(ine))
        ga, gadot = _chain(u, na, cu, udot, adot, gu, row * c0)
        gz = torch.mm(gadot, G).mul_(h * r).to(z.dtype) if need_z else None
        return (ga.to(a.dtype) if need_a else None, ge.to(e.dtype) if need_e else None, gz,
                gg.to(g.dtype) if need_g else None) + (None,) * 7


def _inverse_norms(e):
    """``1 / max(|e_k|, EPS)`` and the mask ``|e_k| > EPS`` (where the normalization projects;
    below EPS it is linear, like ``F.normalize``), both as [K, 1] columns."""
    norm = torch.linalg.vector_norm(e, dim=1).unsqueeze(1)
    return norm.clamp_min(EPS).reciprocal_(), (norm > EPS).to(e.dtype)


def croft_terms(a, e, z, g, labels, logit_scale=100.0, ratio=0.2, ratio_text=0.5, temperature=1.0,
                potential="sum", penalty="mean", *, backend=None):
    """(CE rows [N], EDR penalty) of CRoFT's main step from shared adapted rows (internal).

    ``a`` [N, D], ``e`` [K, D] are the unnormalized adapted rows made from ``z`` [N, D] and
    ``g`` [K, D] (as in ``edr_penalty_adapted``); ``CE_b`` is the CLIP cross-entropy of
    ``normalize(a_b)`` against ``normalize(e)`` with labels [N] and logit scale s. The torch
    path fuses both (``_CroftTerms``); other backends compose ``clip_cross_entropy`` and
    ``edr_penalty_adapted``."""
    which = resolve_backend(z.device, z.dtype, backend)
    if which != "torch":
        from .similarity_lse import clip_cross_entropy
        ce = clip_cross_entropy(F.normalize(a, dim=1, eps=EPS), F.normalize(e, dim=1, eps=EPS), labels,
                                logit_scale, reduction="none", backend=which)
        return ce, edr_penalty_adapted(a, e, z, g, ratio, ratio_text, temperature, potential,
                                       penalty, backend=which)
    inv_t, cphi, cr = _constants(z.shape[0], g.shape[0], z.shape[1], temperature, potential, penalty)
    ce, R = _CroftTerms.apply(a, e, z, g, labels, float(logit_scale), float(ratio), float(ratio_text),
                              inv_t, cphi, cr)
    return ce.to(z.dtype), R.to(z.dtype)


# ---------------------------------------------------------------- torch path: chunks over K
def _torch_forward(u, g, wt_eff, inv_t, cphi, keep=False, e=None):
    """(sum_k P_bk v_k [N, D], sum_k beta_k^T g_k [D, D], kept text state) over K chunks.

    With one chunk and ``keep``, the text rows v and norms |e| are kept for the backward (at
    most KEEP_TEXT_ELEMENTS floats), saving its recomputation of e = g W_eff^T. With ``e``
    given (``wt_eff=None``) the text rows are normalized from it instead."""
    us = u * inv_t
    row = torch.zeros_like(u)
    g_text = None  # the first chunk's product starts it: no D x D zero fill
    step = _chunk(u.shape[0], g.shape[0])
    for k0 in range(0, g.shape[0], step):
        gc = g[k0:k0 + step]
        ne, v, cv = _text_rows(gc, wt_eff, None if e is None else e[k0:k0 + step])
        p = torch.mm(us, v.t()).exp_()
        row.addmm_(p, v)
        beta = _project(v, torch.mm(p.t(), u), cv).mul_(cphi * inv_t / ne)
        g_text = torch.mm(beta.t(), gc) if g_text is None else g_text.addmm_(beta.t(), gc)
    single = step >= g.shape[0]
    text_state = (v, ne) if keep and single and cv is None else ()
    return row, g_text, text_state


def _torch_backward(u, udot, g, wt_eff, H, rt, inv_t, cphi, text_state=(), need_g=True, need_wt=True,
                    e=None):
    """Row sums (Q v, P vdot) [N, D], grad g [K, D] and grad W_t / r_t [D, D], chunked over K.

    Per chunk: [e | edot] = g [W_eff^T | r_t H^T], then P, Q = c_phi P m with
    m = [udot, u] . [v, vdot] / T, the column sums, and the text-side chain rule. With ``e``
    given (``wt_eff=None``) the last two outputs are grad g's direct part and grad e [K, D]."""
    D = u.shape[1]
    us, uds = u * inv_t, udot * (inv_t * cphi)
    H_t = H * rt
    qv, pvd = torch.zeros_like(u), torch.zeros_like(u)
    gg = torch.empty_like(g) if need_g else None
    # grad e [K, D] when e was given; else grad W_t / r_t [D, D], started by the first chunk
    gwt = u.new_empty(g.shape) if need_wt and wt_eff is None else None
    u_udot = torch.cat([u, udot], dim=1)                       # [N, 2D]
    step = _chunk(u.shape[0], g.shape[0])
    for k0 in range(0, g.shape[0], step):
        gc = g[k0:k0 + step]
        if text_state:
            (v, ne), cv = text_state, None
        else:
            ne, v, cv = _text_rows(gc, wt_eff, None if e is None else e[k0:k0 + step])
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
        ge, gedot = _text_backward(v, ne, cv, vdot, edot, qu, pu_pud[:, D:], pu_pud[:, :D],
                                   inv_t, cphi)
        gg_c, gwt_c = _text_grads(ge, gedot, gc, wt_eff, H_t, need_g, need_wt)
        if need_g:
            gg[k0:k0 + step] = gg_c
        if need_wt:
            if wt_eff is None:
                gwt[k0:k0 + step] = gwt_c
            else:
                gwt = gwt_c if gwt is None else gwt.add_(gwt_c)
    return qv, pvd, gg, gwt


# ---------------------------------------------------------------- triton path: two passes
def _triton_forward(u, g, wt_eff, inv_t, cphi, keep=False, e=None):
    from ..kernels import edr as kernels
    ne, v, cv = _text_rows(g, wt_eff, e)
    row, col = kernels.edr_pass(u, v, inv_t), kernels.edr_pass(v, u, inv_t)
    beta = _project(v, col, cv) * (cphi * inv_t / ne)
    return row, torch.mm(beta.t(), g), ()


def _triton_backward(u, udot, g, wt_eff, H, rt, inv_t, cphi, text_state=(), need_g=True, need_wt=True,
                     e=None):
    from ..kernels import edr as kernels
    ne, v, cv = _text_rows(g, wt_eff, e)
    edot = torch.mm(g, H.t()).mul_(rt)
    vdot = (_project(v, edot, cv) / ne).contiguous()
    qv, pvd, _ = kernels.edr_pass(u, v, inv_t, own_dot=udot.contiguous(), other_dot=vdot, cphi=cphi)
    qu, pud, pu = kernels.edr_pass(v, u, inv_t, own_dot=vdot, other_dot=udot.contiguous(), cphi=cphi)
    ge, gedot = _text_backward(v, ne, cv, vdot, edot, qu, pud, pu, inv_t, cphi)
    gg, gwt = _text_grads(ge, gedot, g, wt_eff, H * rt, need_g, need_wt)
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
    inv_t, cphi, cr = _constants(z.shape[0], text_features.shape[0], D, temperature, potential, penalty)
    which = resolve_backend(z.device, z.dtype, backend)
    if which == "reference":
        return reference.edr_penalty(z, text_features, image_weight, text_weight, ratio, ratio_text,
                                     float(temperature), potential, penalty)
    args = (z, text_features, image_weight, text_weight, float(ratio), float(ratio_text),
            inv_t, cphi, cr, which)
    if torch.compiler.is_compiling():  # opaque custom op for torch.compile (ops/library.py)
        return torch.ops.vlood_fast.edr_penalty(*args)[0].to(z.dtype)
    return _EDRPenalty.apply(*args).to(z.dtype)
