"""OGEN batched synthesis: top-k neighbour search over a bank + the generator, one memory-lean pass.

For queries ``q_u`` and a bank of C (key ``b_c``, value ``v_c``) rows,

    N(u) = top-k_c (q_u . b_c)                                (discrete; ties -> lower c)
    out_u = normalize(FFN(q_u) + MHA(q_u, b_{N(u)}, v_{N(u)}))

with ``nn.MultiheadAttention`` semantics. The U x C similarity matrix never exists: the search
streams the bank in chunks per query block and merges a running top-k (torch path), or does
the same in one Triton program per query block (triton path). Gradients reach queries, bank
rows and every generator parameter through the attention, not through the selection.

Memory: the forward keeps the [U, k] indices and the dropout multiplier for backward (it
projects the whole bank into [C, D] tables when that is fewer FLOPs, see ``_project_bank``,
and keeps them for the backward only while small, see ``BACKWARD_TABLE_BYTES``); the backward
recomputes each query chunk's attention and epilogue and backpropagates it in closed form, so
at large C its peak is the gradients themselves.
"""
from collections import namedtuple

import torch
import torch.nn as nn

from .. import _validation as V
from ..dispatch import resolve_backend
from ..reference import ogen as reference

CHUNK_ELEMENTS = 1 << 20  # ~4 MB of fp32 per temporary: similarity chunks, [n, k, D] gathers
MAX_K = 8
NORM_EPS = 1e-12  # F.normalize's eps

Params = namedtuple("Params", "wq bq wk bk wv bv wo bo w1 b1 w2 b2")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _split_params(tensors, acc):
    in_w, in_b, out_w, out_b, w1, b1, w2, b2 = (t.to(acc) for t in tensors)
    wq, wk, wv = in_w.chunk(3)
    bq, bk, bv = in_b.chunk(3)
    return Params(wq, bq, wk, bk, wv, bv, out_w, out_b, w1, b1, w2, b2)


def _project_bank(U: int, C: int, k: int) -> bool:
    """Project the whole bank once (C rows) or only the gathered rows (U k rows): fewer FLOPs wins."""
    return C <= U * k


SEARCH_ROWS = 1024  # queries per search block: the bank is streamed once per block
# The backward reuses the forward's projected [C, D] bank tables (and accumulates [C, D] table
# gradients) only while those four buffers fit in this budget; above it, it projects the
# gathered rows per chunk (more FLOPs when U k > C, but no [C, D] temporaries besides the grads).
BACKWARD_TABLE_BYTES = 64 << 20


def _query_block(k: int, D: int) -> int:
    """Queries per attention chunk: [n, k, D] temporaries of ~2 MB (a dozen are alive at once)."""
    return max(16, (CHUNK_ELEMENTS // 2) // (k * D))


# ---------------------------------------------------------------- search (torch path)
def _search_block(q, bank_keys, k, exclude):
    """Indices [n, k] of the top-k bank rows for the query block ``q`` (acc dtype), bank chunked."""
    n, C = q.shape[0], bank_keys.shape[0]
    step = max(k + 1, min(C, CHUNK_ELEMENTS // n))
    rows = torch.arange(n, device=q.device)
    run_v = run_i = None
    for c0 in range(0, C, step):
        s = torch.mm(q, bank_keys[c0:c0 + step].to(q.dtype).t())
        if exclude is not None:
            local = exclude - c0
            hit = (local >= 0) & (local < s.shape[1])
            s[rows[hit], local[hit]] = float("-inf")
        if run_v is None:
            run_v, run_i = reference.topk_lowest_index(s, k)
            run_i = run_i + c0
            continue
        # only rows whose chunk max beats their k-th value can change (chunk indices are all
        # higher than the running ones, so an equal value never displaces one)
        live = (s.amax(dim=1) > run_v[:, k - 1]).nonzero().squeeze(1)
        if live.numel() == 0:
            continue
        v, i = reference.topk_lowest_index(s[live] if live.numel() < n else s, k)
        v, i = reference.rank_candidates(torch.cat([run_v[live], v], 1),
                                         torch.cat([run_i[live], i + c0], 1), k)
        run_v[live], run_i[live] = v, i
    return run_i


def _torch_search(queries, bank_keys, k, exclude):
    acc = _acc_dtype(queries.dtype)
    U = queries.shape[0]
    n = min(U, SEARCH_ROWS)
    out = torch.empty(U, k, dtype=torch.int64, device=queries.device)
    for u0 in range(0, U, n):
        ex = exclude[u0:u0 + n] if exclude is not None else None
        out[u0:u0 + n] = _search_block(queries[u0:u0 + n].to(acc), bank_keys, k, ex)
    return out


def _triton_search(queries, bank_keys, k, exclude):
    from ..kernels import synthesis as kernels
    return kernels.synthesis(queries, bank_keys, None, None, None, k, 1, exclude=exclude,
                             attend=False)[0]


# ---------------------------------------------------------------- attention + epilogue pieces
def _attend(qs, kg, vg, mult, heads):
    """p [n, k, H] = softmax_j(qs_h . kg_jh), ctx [n, D] = sum_j (p * mult)_jh vg_jh."""
    n, k, D = kg.shape
    dh = D // heads
    scores = (qs[:, None, :] * kg).view(n, k, heads, dh).sum(-1)
    p = torch.softmax(scores, dim=1)
    pd = p if mult is None else p * mult
    ctx = (pd[..., None] * vg.view(n, k, heads, dh)).sum(1).reshape(n, D)
    return p, ctx


def _epilogue(q, ctx, P):
    """(y, hpre): y = out_proj(ctx) + FFN(q) before normalization, hpre the FFN's pre-ReLU."""
    hpre = torch.addmm(P.b1, q, P.w1.t())
    y = torch.addmm(P.b2, hpre.relu(), P.w2.t())
    return y.addmm_(ctx, P.wo.t()).add_(P.bo), hpre


def _normalize(y):
    norm = y.norm(dim=1, keepdim=True)
    return y / norm.clamp_min(NORM_EPS), norm


def _gather_projected(rows, P, bank_keys, bank_values, kp, vp, acc):
    """Projected keys/values of bank rows ``rows`` [n, k]: from the tables, or projected now."""
    n, k = rows.shape
    flat = rows.reshape(-1)
    if kp is not None:
        return kp[flat].view(n, k, -1), vp[flat].view(n, k, -1)
    kg = torch.addmm(P.bk, bank_keys[flat].to(acc), P.wk.t())
    vg = torch.addmm(P.bv, bank_values[flat].to(acc), P.wv.t())
    return kg.view(n, k, -1), vg.view(n, k, -1)


def _bank_tables(bank_keys, bank_values, P, acc):
    return (torch.addmm(P.bk, bank_keys.to(acc), P.wk.t()),
            torch.addmm(P.bv, bank_values.to(acc), P.wv.t()))


# ---------------------------------------------------------------- forward paths
def _torch_forward(queries, bank_keys, bank_values, P, k, heads, exclude, mult):
    acc = P.wq.dtype
    U, D = queries.shape
    scaling = (D // heads) ** -0.5
    idx = _torch_search(queries, bank_keys, k, exclude)
    kp = vp = None
    if _project_bank(U, bank_keys.shape[0], k):
        kp, vp = _bank_tables(bank_keys, bank_values, P, acc)
    out = torch.empty(U, D, dtype=queries.dtype, device=queries.device)
    n = min(U, _query_block(k, D))
    for u0 in range(0, U, n):
        q = queries[u0:u0 + n].to(acc)
        kg, vg = _gather_projected(idx[u0:u0 + n], P, bank_keys, bank_values, kp, vp, acc)
        qs = torch.addmm(P.bq, q, P.wq.t()).mul_(scaling)
        _, ctx = _attend(qs, kg, vg, mult[u0:u0 + n] if mult is not None else None, heads)
        out[u0:u0 + n] = _normalize(_epilogue(q, ctx, P)[0])[0]
    return out, idx, kp, vp


def _triton_forward(queries, bank_keys, bank_values, P, k, heads, exclude, mult):
    from ..kernels import synthesis as kernels
    acc = P.wq.dtype
    U, D = queries.shape
    q = queries.to(acc)
    qs = torch.addmm(P.bq, q, P.wq.t()).mul_((D // heads) ** -0.5)
    kp = vp = None
    if _project_bank(U, bank_keys.shape[0], k):
        kp, vp = _bank_tables(bank_keys, bank_values, P, acc)
        idx, _, ctx = kernels.synthesis(queries, bank_keys, qs, kp, vp, k, heads,
                                        exclude=exclude, multiplier=mult)
    else:
        idx = kernels.synthesis(queries, bank_keys, None, None, None, k, heads,
                                exclude=exclude, attend=False)[0]
        kg, vg = _gather_projected(idx, P, bank_keys, bank_values, None, None, acc)
        _, _, ctx = kernels.synthesis(queries, bank_keys, qs, kg.view(U * k, D), vg.view(U * k, D),
                                      k, heads, multiplier=mult, indices=idx, search=False,
                                      row_from_slot=True)
    out = _normalize(_epilogue(q, ctx, P)[0])[0].to(queries.dtype)
    return out, idx, kp, vp


_FORWARD = {"torch": _torch_forward, "triton": _triton_forward}


# ---------------------------------------------------------------- backward (shared, chunked)
def _backward(queries, bank_keys, bank_values, P, idx, mult, grad_out, heads, needs, kp=None, vp=None):
    """Closed-form gradients, recomputing each query chunk's forward from the saved indices.

    Table mode (``kp``/``vp`` given): gather projected rows from the tables and accumulate
    [C, D] table gradients, turned into bank gradients by one GEMM at the end. Gathered mode:
    project the gathered rows per chunk; no [C, D] buffer besides the gradients themselves.
    """
    tables = kp is not None
    acc = P.wq.dtype
    U, D = queries.shape
    k = idx.shape[1]
    dh = D // heads
    scaling = dh ** -0.5
    need_q, need_bk, need_bv = needs[:3]
    need_params = any(needs[3:])
    g_par = {name: torch.zeros_like(getattr(P, name)) for name in P._fields} if need_params else None
    dq_all = torch.empty(U, D, dtype=queries.dtype, device=queries.device) if need_q else None
    need_dk = need_bk or (tables and need_params)  # table mode: d(Kp) feeds dW_k too
    need_dv = need_bv or (tables and need_params)
    d_bank_keys = torch.zeros(bank_keys.shape, dtype=acc, device=queries.device) if need_dk else None
    d_bank_values = torch.zeros(bank_values.shape, dtype=acc, device=queries.device) if need_dv else None
    n = min(U, _query_block(k, D))
    for u0 in range(0, U, n):
        q = queries[u0:u0 + n].to(acc)
        m = q.shape[0]
        flat = idx[u0:u0 + n].reshape(-1)
        mu = mult[u0:u0 + n] if mult is not None else None
        if tables:
            kg, vg = kp[flat].view(m, k, D), vp[flat].view(m, k, D)
        else:
            kraw, vraw = bank_keys[flat].to(acc), bank_values[flat].to(acc)
            kg = torch.addmm(P.bk, kraw, P.wk.t()).view(m, k, D)
            vg = torch.addmm(P.bv, vraw, P.wv.t()).view(m, k, D)
        qs = torch.addmm(P.bq, q, P.wq.t()).mul_(scaling)
        p, ctx = _attend(qs, kg, vg, mu, heads)
        y, hpre = _epilogue(q, ctx, P)
        out, norm = _normalize(y)
        g = grad_out[u0:u0 + n].to(acc)
        # normalize: dy = (g - out (out . g)) / |y|   (g / eps where |y| <= eps)
        dy = (g - out * ((out * g).sum(1, keepdim=True) * (norm > NORM_EPS))) / norm.clamp_min(NORM_EPS)
        dh_ = torch.mm(dy, P.w2).mul_(hpre > 0)
        dctx = torch.mm(dy, P.wo)
        # attention over the k neighbours, per head
        dctx_h = dctx.view(m, 1, heads, dh)
        pd = p if mu is None else p * mu
        dpd = (dctx_h * vg.view(m, k, heads, dh)).sum(-1)
        dp = dpd if mu is None else dpd * mu
        ds = p * (dp - (p * dp).sum(1, keepdim=True))
        dqs = (ds[..., None] * kg.view(m, k, heads, dh)).sum(1).reshape(m, D).mul_(scaling)
        dkg = (ds[..., None] * qs.view(m, 1, heads, dh)).reshape(m * k, D)
        dvg = (pd[..., None] * dctx_h).reshape(m * k, D)
        if need_params:
            g_par["wo"].addmm_(dy.t(), ctx)
            g_par["bo"] += dy.sum(0)
            g_par["w2"].addmm_(dy.t(), hpre.relu())
            g_par["b2"] += dy.sum(0)
            g_par["w1"].addmm_(dh_.t(), q)
            g_par["b1"] += dh_.sum(0)
            g_par["wq"].addmm_(dqs.t(), q)
            g_par["bq"] += dqs.sum(0)
            if not tables:
                g_par["wk"].addmm_(dkg.t(), kraw)
                g_par["bk"] += dkg.sum(0)
                g_par["wv"].addmm_(dvg.t(), vraw)
                g_par["bv"] += dvg.sum(0)
        if need_q:
            dq_all[u0:u0 + n] = torch.mm(dh_, P.w1).addmm_(dqs, P.wq)
        if need_dk:
            d_bank_keys.index_add_(0, flat, dkg if tables else torch.mm(dkg, P.wk))
        if need_dv:
            d_bank_values.index_add_(0, flat, dvg if tables else torch.mm(dvg, P.wv))
    if tables:  # d_bank_* hold d(Kp), d(Vp): dW = d(Kp)^T bank, d(bank) = d(Kp) W
        if need_params:
            g_par["wk"].addmm_(d_bank_keys.t(), bank_keys.to(acc))
            g_par["bk"] += d_bank_keys.sum(0)
            g_par["wv"].addmm_(d_bank_values.t(), bank_values.to(acc))
            g_par["bv"] += d_bank_values.sum(0)
        d_bank_keys = torch.mm(d_bank_keys, P.wk) if need_bk else None
        d_bank_values = torch.mm(d_bank_values, P.wv) if need_bv else None
    if need_bk:
        d_bank_keys = d_bank_keys.to(bank_keys.dtype)
    if need_bv:
        d_bank_values = d_bank_values.to(bank_values.dtype)
    return dq_all, d_bank_keys, d_bank_values, g_par


def _keep_tables(kp):
    """Whether the backward reuses the forward's [C, D] tables (see BACKWARD_TABLE_BYTES)."""
    return kp is not None and 4 * kp.numel() * kp.element_size() <= BACKWARD_TABLE_BYTES


# ---------------------------------------------------------------- autograd
class _Synthesis(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, bank_keys, bank_values, in_w, in_b, out_w, out_b, w1, b1, w2, b2,
                exclude, mult, k, heads, backend):
        P = _split_params((in_w, in_b, out_w, out_b, w1, b1, w2, b2), _acc_dtype(queries.dtype))
        out, idx, kp, vp = _FORWARD[backend](queries, bank_keys, bank_values, P, k, heads, exclude, mult)
        if not _keep_tables(kp):
            kp = vp = None
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(queries, bank_keys, bank_values, in_w, in_b, out_w, out_b, w1, b1,
                              w2, b2, idx, mult, kp, vp)
        ctx.heads = heads
        return out, idx

    @staticmethod
    def backward(ctx, grad_out, _grad_idx):
        (queries, bank_keys, bank_values, in_w, in_b, out_w, out_b, w1, b1, w2, b2,
         idx, mult, kp, vp) = ctx.saved_tensors
        params = (in_w, in_b, out_w, out_b, w1, b1, w2, b2)
        P = _split_params(params, _acc_dtype(queries.dtype))
        if kp is not None and torch.is_grad_enabled():
            # double backward: the saved tables carry no graph; rebuild them differentiably
            kp, vp = _bank_tables(bank_keys, bank_values, P, P.wq.dtype)
        needs = ctx.needs_input_grad[:11]
        dq, dbk, dbv, g = _backward(queries, bank_keys, bank_values, P, idx, mult, grad_out,
                                    ctx.heads, needs, kp, vp)
        grads = [None] * 8
        if g is not None:
            grads = [torch.cat([g["wq"], g["wk"], g["wv"]]), torch.cat([g["bq"], g["bk"], g["bv"]]),
                     g["wo"], g["bo"], g["w1"], g["b1"], g["w2"], g["b2"]]
            grads = [gr.to(p.dtype) if need else None
                     for gr, p, need in zip(grads, params, needs[3:])]
        return (dq, dbk, dbv, *grads, None, None, None, None, None)


# ---------------------------------------------------------------- validation + public ops
def _check_k(k, available, what):
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must lie in [1, {MAX_K}], got {k}")
    if k > available:
        raise ValueError(f"k={k} exceeds the {available} bank rows available per query ({what})")


def _check_exclude(exclude, U, C, device):
    if exclude is None:
        return None
    if not isinstance(exclude, torch.Tensor):
        raise TypeError(f"exclude must be None or an integer tensor of shape [{U}], "
                        f"got {type(exclude).__name__}")
    if exclude.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"exclude must be an integer tensor of shape [{U}], got {exclude.dtype}")
    if exclude.shape != (U,):
        raise ValueError(f"exclude must have shape [{U}] (one bank index per query), "
                         f"got {tuple(exclude.shape)}")
    if exclude.device != device:
        raise ValueError(f"exclude is on {exclude.device} but the queries are on {device}")
    lo, hi = int(exclude.min()), int(exclude.max())
    if lo < 0 or hi >= C:
        raise ValueError(f"exclude must hold bank indices in [0, {C}), got values in [{lo}, {hi}]")
    return exclude.long().contiguous()


def _check_search(queries, bank_keys, k, exclude, qname="queries", bname="bank_keys"):
    V.check_matrix(qname, queries, "[U, D]")
    V.check_matrix(bname, bank_keys, "[C, D]")
    V.check_same_dim(qname, queries, bname, bank_keys)
    V.check_compatible(**{qname: queries, bname: bank_keys})
    U, C = queries.shape[0], bank_keys.shape[0]
    exclude = _check_exclude(exclude, U, C, queries.device)
    _check_k(k, C - (exclude is not None), "C minus the excluded row" if exclude is not None else "C")
    return exclude


def topk_neighbours(queries, bank_keys, k=3, exclude=None, *, backend=None):
    """Indices of the k bank rows with the highest dot product per query; no U x C matrix.

    Ties rank the lower bank index first (identical across backends). ``exclude[u]`` removes
    one bank row from query u's candidates (e.g. the query's own class).

    Args:
        queries: ``[U, D]`` float; bank_keys: ``[C, D]``, same dtype and device.
        k: 1..8, at most C (C - 1 with ``exclude``).
        exclude: optional integer ``[U]`` in ``[0, C)``.
    Returns:
        int64 ``[U, k]``, best first.

    Example::

        mu = class_means                                                # [C, D]
        nbrs = topk_neighbours(mu, mu, 3, exclude=torch.arange(len(mu)))  # OGEN's N(c)
    """
    exclude = _check_search(queries, bank_keys, k, exclude)
    which = resolve_backend(queries.device, queries.dtype, backend)
    with torch.no_grad():
        if which == "reference":
            return reference.select_neighbours(queries, bank_keys, k, exclude)
        if which == "triton":
            return _triton_search(queries, bank_keys, k, exclude)
        return _torch_search(queries, bank_keys, k, exclude)


def _generator_tensors(generator):
    attn = getattr(generator, "attn", None)
    ffn = getattr(generator, "ffn", None)
    if not isinstance(attn, nn.MultiheadAttention) or not isinstance(ffn, nn.Sequential) or len(ffn) != 3:
        raise TypeError("generator must be an OgenGenerator (attn: nn.MultiheadAttention, "
                        "ffn: Sequential(Linear, ReLU, Linear))")
    if attn.in_proj_weight is None or attn.in_proj_bias is None:
        raise ValueError("generator.attn must use a packed in_proj with biases")
    return (attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
            ffn[0].weight, ffn[0].bias, ffn[2].weight, ffn[2].bias)


def synthesize(generator, queries, bank_keys, bank_values, k=3, exclude=None, *, backend=None):
    """OGEN batched synthesis: ``Gen(q_u, b_{N(u)}, v_{N(u)})`` with N(u) the top-k bank rows by q . b.

    Never materializes the U x C similarities (see module docstring). Differentiable w.r.t.
    queries, bank_keys, bank_values and the generator's parameters; the selection is discrete.
    Dropout (generator.training) drops attention weights as ``nn.MultiheadAttention`` does.

    Args:
        generator: an ``OgenGenerator`` (D = its dim); parameters of any float dtype.
        queries: ``[U, D]``; bank_keys, bank_values: ``[C, D]``; one dtype and device.
        k: neighbours per query, 1..8; exclude: optional integer ``[U]`` bank row to skip per query.
        backend: ``"reference" | "torch" | "triton"``; default by device.
    Returns:
        ``(features [U, D]`` in the queries' dtype, unit norm, ``indices [U, k]`` int64, best first).

    Example::

        gen = vlood_fast.OgenGenerator(512).eval()
        feats, nbrs = synthesize(gen, new_text, base_text, class_means, k=3)
        logits = 100 * feats @ new_text.T
    """
    tensors = _generator_tensors(generator)
    exclude = _check_search(queries, bank_keys, k, exclude)
    V.check_matrix("bank_values", bank_values, "[C, D]")
    V.check_compatible(queries=queries, bank_values=bank_values)
    if bank_values.shape != bank_keys.shape:
        raise ValueError(f"bank_values must have shape {list(bank_keys.shape)} like bank_keys "
                         f"([C, D]), got {list(bank_values.shape)}")
    dim = generator.attn.embed_dim
    if queries.shape[1] != dim:
        raise ValueError(f"queries have feature dim {queries.shape[1]} but the generator's dim is {dim}")
    if tensors[0].device != queries.device:
        raise ValueError(f"generator is on {tensors[0].device} but the queries are on {queries.device}")
    which = resolve_backend(queries.device, queries.dtype, backend)
    if which == "reference":
        return reference.synthesize(generator, queries, bank_keys, bank_values, k, exclude)
    heads = generator.attn.num_heads
    drop = generator.attn.dropout if generator.training else 0.0
    mult = None
    if drop > 0:
        keep = 1.0 - drop
        shape = (queries.shape[0], k, heads)
        mult = torch.empty(shape, device=queries.device, dtype=_acc_dtype(queries.dtype))
        if keep > 0:
            mult.bernoulli_(keep).div_(keep)
        else:
            mult.zero_()
    return _Synthesis.apply(queries, bank_keys, bank_values, *tensors, exclude, mult, k, heads, which)
