"""OGEN batched synthesis: similarity, streaming top-k and k-neighbour attention in one pass.

For query rows ``q_u`` (raw, for the search), their projected and pre-scaled attention queries
``qs_u = (q_u W_q^T + b_q) / sqrt(dh)``, a bank of C key rows ``b_c`` and projected key/value
tables ``Kp``, ``Vp``, one program owns BLOCK_U queries and

1. streams the bank in BLOCK_C tiles, computing ``s_uc = q_u . b_c`` (fp32) and merging each
   tile into a running top-k held as a [BLOCK_U, KP] (value, index) pair: K rounds of "best of
   tile and running list", ties to the lowest bank index; the U x C matrix never exists;
2. gathers the k chosen rows of Kp and Vp and runs per-head attention over them:
   ``p_ujh = softmax_j(qs_uh . Kp_{idx_uj, h})``, ``ctx_uh = sum_j p_ujh m_ujh Vp_{idx_uj, h}``
   with ``m`` an optional dropout multiplier.

Outputs: indices [U, K] (int64), probabilities p [U, K, H] (fp32, before dropout; all the
backward needs besides recomputable GEMMs) and ctx [U, D] (fp32). Projections, out_proj and the
FFN are GEMMs outside. Flags split the pass when the caller projects only the gathered rows:
SEARCH (step 1), ATTEND (step 2), ROW_FROM_SLOT (row j of query u is table row u*K + j).

Only ``@triton.jit`` code and thin launchers live here; autograd is in ``vlood_fast.ops``.
"""
import torch
import triton
import triton.language as tl

from .similarity_lse import _similarity_tile, interpreting

MAX_K = 8


@triton.jit
def _synthesis_kernel(q_ptr, bank_ptr, qs_ptr, kp_ptr, vp_ptr, exclude_ptr, mult_ptr,
                      idx_ptr, p_ptr, ctx_ptr,
                      U, C, D, head_dim,
                      stride_qu, stride_qd, stride_bc, stride_bd, stride_su, stride_sd,
                      stride_kr, stride_kd, stride_vr, stride_vd, stride_cu, stride_cd,
                      K: tl.constexpr, KP: tl.constexpr, H: tl.constexpr, KHP: tl.constexpr,
                      SEARCH: tl.constexpr, ATTEND: tl.constexpr, ROW_FROM_SLOT: tl.constexpr,
                      HAS_EXCLUDE: tl.constexpr, HAS_MULT: tl.constexpr,
                      BLOCK_U: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                      DOT_FP32: tl.constexpr):
    pid = tl.program_id(0)
    offs_u = pid * BLOCK_U + tl.arange(0, BLOCK_U)
    mask_u = offs_u < U
    slots = tl.arange(0, KP)

    if SEARCH:
        # ---- 1. streaming top-k over the bank
        if HAS_EXCLUDE:
            excluded = tl.load(exclude_ptr + offs_u, mask=mask_u, other=-1)
        run_v = tl.full([BLOCK_U, KP], float("-inf"), dtype=tl.float32)
        run_i = tl.full([BLOCK_U, KP], 2147483647, dtype=tl.int32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            s = _similarity_tile(q_ptr, bank_ptr, offs_u, offs_c, mask_u, mask_c, D,
                                 stride_qu, stride_qd, stride_bc, stride_bd,
                                 BLOCK_U, BLOCK_C, BLOCK_D, DOT_FP32)
            valid = mask_c[None, :] & mask_u[:, None]
            if HAS_EXCLUDE:
                valid = valid & (offs_c[None, :] != excluded[:, None])
            s = tl.where(valid, s, float("-inf"))
            cidx = tl.where(valid, offs_c[None, :], 2147483647)
            # a tile can only change rows whose tile max beats their current k-th value
            # (tile indices all exceed running ones, so an equal value never wins)
            kth = tl.min(tl.where(slots[None, :] < K, run_v, float("inf")), axis=1)
            need = tl.max((tl.max(s, axis=1) > kth).to(tl.int32), axis=0)
            if need > 0:
                new_v = tl.full([BLOCK_U, KP], float("-inf"), dtype=tl.float32)
                new_i = tl.full([BLOCK_U, KP], 2147483647, dtype=tl.int32)
                for r in tl.static_range(K):
                    best = tl.maximum(tl.max(s, axis=1), tl.max(run_v, axis=1))
                    pick = tl.minimum(
                        tl.min(tl.where(s == best[:, None], cidx, 2147483647), axis=1),
                        tl.min(tl.where(run_v == best[:, None], run_i, 2147483647), axis=1))
                    new_v = tl.where(slots[None, :] == r, best[:, None], new_v)
                    new_i = tl.where(slots[None, :] == r, pick[:, None], new_i)
                    taken = cidx == pick[:, None]
                    s = tl.where(taken, float("-inf"), s)
                    cidx = tl.where(taken, 2147483647, cidx)
                    taken_run = run_i == pick[:, None]
                    run_v = tl.where(taken_run, float("-inf"), run_v)
                    run_i = tl.where(taken_run, 2147483647, run_i)
                run_v = new_v
                run_i = new_i
        for j in tl.static_range(K):
            idx_j = tl.sum(tl.where(slots[None, :] == j, run_i, 0), axis=1)
            tl.store(idx_ptr + offs_u * K + j, idx_j.to(tl.int64), mask=mask_u)

    if ATTEND:
        # ---- 2. per-head attention over the K gathered neighbours
        cols = tl.arange(0, KHP)  # column j * H + h of the [BLOCK_U, K*H] score tile
        col_ok = cols < K * H
        scores = tl.zeros([BLOCK_U, KHP], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            head = offs_d // head_dim
            m2 = mask_u[:, None] & mask_d[None, :]
            qs = tl.load(qs_ptr + offs_u[:, None] * stride_su + offs_d[None, :] * stride_sd,
                         mask=m2, other=0.0).to(tl.float32)
            for j in tl.static_range(K):
                if ROW_FROM_SLOT:
                    row = offs_u.to(tl.int64) * K + j
                elif SEARCH:
                    row = tl.sum(tl.where(slots[None, :] == j, run_i, 0), axis=1).to(tl.int64)
                else:
                    row = tl.load(idx_ptr + offs_u * K + j, mask=mask_u, other=0)
                row = tl.where(mask_u, row, 0)
                kt = tl.load(kp_ptr + row[:, None] * stride_kr + offs_d[None, :] * stride_kd,
                             mask=m2, other=0.0).to(tl.float32)
                prod = qs * kt
                for h in tl.static_range(H):
                    part = tl.sum(tl.where(head[None, :] == h, prod, 0.0), axis=1)
                    scores += tl.where(cols[None, :] == j * H + h, part[:, None], 0.0)
        # softmax over j for each head h (columns h, H + h, 2H + h, ...)
        p = tl.zeros([BLOCK_U, KHP], dtype=tl.float32)
        for h in tl.static_range(H):
            sel = col_ok & (cols % H == h)
            mx = tl.max(tl.where(sel[None, :], scores, float("-inf")), axis=1)
            e = tl.where(sel[None, :], tl.exp(scores - mx[:, None]), 0.0)
            p += e / tl.sum(e, axis=1)[:, None]
        pk_mask = mask_u[:, None] & col_ok[None, :]
        tl.store(p_ptr + offs_u[:, None] * (K * H) + cols[None, :], p, mask=pk_mask)
        if HAS_MULT:
            p = p * tl.load(mult_ptr + offs_u[:, None] * (K * H) + cols[None, :], mask=pk_mask,
                            other=0.0)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            head = offs_d // head_dim
            m2 = mask_u[:, None] & mask_d[None, :]
            acc = tl.zeros([BLOCK_U, BLOCK_D], dtype=tl.float32)
            for j in tl.static_range(K):
                if ROW_FROM_SLOT:
                    row = offs_u.to(tl.int64) * K + j
                elif SEARCH:
                    row = tl.sum(tl.where(slots[None, :] == j, run_i, 0), axis=1).to(tl.int64)
                else:
                    row = tl.load(idx_ptr + offs_u * K + j, mask=mask_u, other=0)
                row = tl.where(mask_u, row, 0)
                vt = tl.load(vp_ptr + row[:, None] * stride_vr + offs_d[None, :] * stride_vd,
                             mask=m2, other=0.0).to(tl.float32)
                w = tl.zeros([BLOCK_U, BLOCK_D], dtype=tl.float32)
                for h in tl.static_range(H):
                    p_jh = tl.sum(tl.where(cols[None, :] == j * H + h, p, 0.0), axis=1)
                    w = tl.where(head[None, :] == h, p_jh[:, None], w)
                acc += w * vt
            tl.store(ctx_ptr + offs_u[:, None] * stride_cu + offs_d[None, :] * stride_cd, acc,
                     mask=m2)


# Chosen with `vlood-fast kernels` so no specialization spills on sm_80 / sm_90: fp32 tiles run
# tf32x3 dots (more registers), so narrower D slices; half tiles use 8 warps.
CONFIGS = {"fp32": dict(BLOCK_D=32, num_warps=4), "half": dict(BLOCK_D=64, num_warps=8)}


def _dot_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or interpreting()


def synthesis(queries, bank_keys, qs, kp, vp, k, num_heads, *, exclude=None, multiplier=None,
              indices=None, search=True, attend=True, row_from_slot=False, out=None,
              block_u=16, block_c=64, block_d=None):
    """Launch the synthesis kernel; returns (indices [U, k] int64, p [U, k, H] fp32, ctx [U, D] fp32).

    ``kp``/``vp`` are the projected key/value tables: [C, D] indexed by bank row, or
    [U * k, D] indexed by slot when ``row_from_slot``. ``p``/``ctx`` are None when not ``attend``;
    without ``search`` the given ``indices`` are used. ``out=(indices, p, ctx)`` writes into
    given tensors (indices and p contiguous; ctx any strides).
    """
    U, D = queries.shape
    C = bank_keys.shape[0]
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must lie in [1, {MAX_K}] for the kernel, got {k}")
    dev = queries.device
    if out is not None:
        out_idx, p, ctx = out
        if search:
            indices = out_idx
        if not indices.is_contiguous() or (p is not None and not p.is_contiguous()):
            raise ValueError("indices and p outputs must be contiguous")
    else:
        if search:
            indices = torch.empty(U, k, device=dev, dtype=torch.int64)
        p = torch.empty(U, k, num_heads, device=dev, dtype=torch.float32) if attend else None
        ctx = torch.empty(U, D, device=dev, dtype=torch.float32) if attend else None
    if not search:
        indices = indices.contiguous()
    dummy = indices  # any valid pointer for the unused arguments
    qs_ = qs if attend else queries
    kp_ = kp if attend else queries
    vp_ = vp if attend else queries
    cfg = CONFIGS["fp32" if queries.dtype == torch.float32 else "half"]
    block_d = block_d or cfg["BLOCK_D"]
    grid = (triton.cdiv(U, block_u),)
    _synthesis_kernel[grid](
        queries, bank_keys, qs_, kp_, vp_,
        exclude if exclude is not None else dummy,
        multiplier if multiplier is not None else dummy,
        indices, p if attend else dummy, ctx if attend else dummy,
        U, C, D, D // num_heads,
        queries.stride(0), queries.stride(1), bank_keys.stride(0), bank_keys.stride(1),
        qs_.stride(0), qs_.stride(1), kp_.stride(0), kp_.stride(1), vp_.stride(0), vp_.stride(1),
        ctx.stride(0) if attend else 0, ctx.stride(1) if attend else 0,
        K=k, KP=max(2, triton.next_power_of_2(k)), H=num_heads,
        KHP=max(2, triton.next_power_of_2(k * num_heads)),
        SEARCH=search, ATTEND=attend, ROW_FROM_SLOT=row_from_slot,
        HAS_EXCLUDE=exclude is not None, HAS_MULT=multiplier is not None,
        BLOCK_U=block_u, BLOCK_C=block_c, BLOCK_D=max(16, min(block_d, triton.next_power_of_2(D))),
        DOT_FP32=_dot_fp32(queries.dtype), num_warps=cfg["num_warps"])
    return indices, p, ctx


def aot_specs(k=3, num_heads=4):
    """The specializations the launchers use on a GPU (k=3, 4 heads), for ``vlood-fast kernels``:
    search + attention over the projected bank tables (the bank is small), search alone, and
    attention over gathered rows (the bank is large); with exclusion and dropout (training)."""
    from vlood_fast.aot import KernelSpec
    kp, khp = max(2, triton.next_power_of_2(k)), max(2, triton.next_power_of_2(k * num_heads))
    modes = {
        "search + attend (bank tables)": dict(SEARCH=True, ATTEND=True, ROW_FROM_SLOT=False,
                                              HAS_EXCLUDE=False, HAS_MULT=False),
        "search + attend (exclude, dropout)": dict(SEARCH=True, ATTEND=True, ROW_FROM_SLOT=False,
                                                   HAS_EXCLUDE=True, HAS_MULT=True),
        "search only": dict(SEARCH=True, ATTEND=False, ROW_FROM_SLOT=False, HAS_EXCLUDE=True,
                            HAS_MULT=False),
        "attend gathered rows": dict(SEARCH=False, ATTEND=True, ROW_FROM_SLOT=True,
                                     HAS_EXCLUDE=False, HAS_MULT=True),
    }
    specs = []
    for dtype in ("fp32", "bf16"):
        cfg = CONFIGS["fp32" if dtype == "fp32" else "half"]
        for label, flags in modes.items():
            signature = dict(q_ptr=f"*{dtype}", bank_ptr=f"*{dtype}", qs_ptr="*fp32", kp_ptr="*fp32",
                             vp_ptr="*fp32", exclude_ptr="*i64", mult_ptr="*fp32", idx_ptr="*i64",
                             p_ptr="*fp32", ctx_ptr="*fp32", U="i32", C="i32", D="i32", head_dim="i32")
            for name in ("qu", "qd", "bc", "bd", "su", "sd", "kr", "kd", "vr", "vd", "cu", "cd"):
                signature[f"stride_{name}"] = "i32"
            specs.append(KernelSpec(
                f"synthesis[{label}]", _synthesis_kernel, dtype, signature=signature,
                constexprs=dict(flags, K=k, KP=kp, H=num_heads, KHP=khp, BLOCK_U=16, BLOCK_C=64,
                                BLOCK_D=cfg["BLOCK_D"], DOT_FP32=dtype == "fp32"),
                num_warps=cfg["num_warps"], num_stages=3))
    return specs
