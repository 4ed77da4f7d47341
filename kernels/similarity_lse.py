"""Fused similarity + logsumexp: forward and backward Triton kernels.

For image rows ``x_b`` and text rows ``t_k`` and a scale ``c`` the forward computes

    lse_b = logsumexp_k(c * x_b . t_k)

streaming K in tiles with an online max/sum (base 2, fp32), so the B x K logits never exist.
The backward needs ``dx_b = c sum_k g_b p_bk t_k`` and ``dt_k = c sum_b g_b p_bk x_b`` with
``p_bk = exp(c x_b . t_k - lse_b)``.  Both are the same "weighted sum" kernel: a row pass owns
rows of ``dx`` and streams text tiles, a column pass owns rows of ``dt`` and streams image tiles.
Each recomputes the similarity tile from the saved per-row lse; neither needs atomics, so the
result is deterministic.

Only ``@triton.jit`` code and thin launchers live here; autograd is in ``vlood_fast.ops``.
"""
import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


@triton.jit
def _similarity_tile(a_ptr, b_ptr, offs_i, offs_j, mask_i, mask_j, D,
                     stride_ai, stride_ad, stride_bj, stride_bd,
                     BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_FP32: tl.constexpr):
    """[BLOCK_I, BLOCK_J] tile of a_i . b_j, accumulated in fp32 over D in BLOCK_D slices."""
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        a = tl.load(a_ptr + offs_i[:, None] * stride_ai + offs_d[None, :] * stride_ad,
                    mask=mask_i[:, None] & mask_d[None, :], other=0.0)
        b = tl.load(b_ptr + offs_j[None, :] * stride_bj + offs_d[:, None] * stride_bd,
                    mask=mask_j[None, :] & mask_d[:, None], other=0.0)
        if DOT_FP32:
            # fp32 inputs: tf32x3 (three tensor-core passes, ~fp32 accuracy); every dtype under
            # the interpreter (its bf16 math is wrong; it computes this dot in plain fp32)
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _lse_forward_kernel(x_ptr, t_ptr, lse_ptr, B, K, D,
                        stride_xb, stride_xd, stride_tk, stride_td, scale_log2,
                        BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                        DOT_FP32: tl.constexpr):
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    m = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_B], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        s = _similarity_tile(x_ptr, t_ptr, offs_b, offs_k, mask_b, mask_k, D,
                             stride_xb, stride_xd, stride_tk, stride_td,
                             BLOCK_B, BLOCK_K, BLOCK_D, DOT_FP32)
        # log2 units: exp(c s) == exp2(c log2(e) s)
        s = tl.where(mask_k[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m = m_new
    lse = (m + tl.log2(l)) * 0.6931471805599453
    tl.store(lse_ptr + offs_b, lse, mask=mask_b)


@triton.jit
def _lse_weighted_sum_kernel(a_ptr, b_ptr, lse_ptr, g_ptr, h_ptr, y_ptr, out_ptr, NI, NJ, D,
                             stride_ai, stride_ad, stride_bj, stride_bd, stride_oi, stride_od,
                             scale_log2, scale,
                             STATS_ON_I: tl.constexpr, HAS_LABELS: tl.constexpr,
                             BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_DO: tl.constexpr, DOT_FP32: tl.constexpr):
    """out_i[d-slice] = scale * sum_j w_ij * b_j[d-slice], w = g * exp(scale a . b - lse) + h * onehot(y).

    STATS_ON_I: lse/g/h/y are indexed by i (row pass: a = image rows, b = text rows);
    otherwise by j (column pass: a = text rows, b = image rows). HAS_LABELS adds the
    cross-entropy target term h_b at (b, y_b).
    """
    pid_i = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < NI
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mask_do = offs_do < D
    if STATS_ON_I:
        lse_i = tl.load(lse_ptr + offs_i, mask=mask_i, other=0.0) * 1.4426950408889634
        g_i = tl.load(g_ptr + offs_i, mask=mask_i, other=0.0)
        if HAS_LABELS:
            y_i = tl.load(y_ptr + offs_i, mask=mask_i, other=-1)
            h_i = tl.load(h_ptr + offs_i, mask=mask_i, other=0.0)
    acc = tl.zeros([BLOCK_I, BLOCK_DO], dtype=tl.float32)
    for j0 in range(0, NJ, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < NJ
        s = _similarity_tile(a_ptr, b_ptr, offs_i, offs_j, mask_i, mask_j, D,
                             stride_ai, stride_ad, stride_bj, stride_bd,
                             BLOCK_I, BLOCK_J, BLOCK_D, DOT_FP32)
        s = s * scale_log2
        if STATS_ON_I:
            w = g_i[:, None] * tl.exp2(s - lse_i[:, None])
            if HAS_LABELS:
                w += tl.where(offs_j[None, :] == y_i[:, None], h_i[:, None], 0.0)
        else:
            lse_j = tl.load(lse_ptr + offs_j, mask=mask_j, other=0.0) * 1.4426950408889634
            g_j = tl.load(g_ptr + offs_j, mask=mask_j, other=0.0)
            w = g_j[None, :] * tl.exp2(s - lse_j[None, :])
            if HAS_LABELS:
                y_j = tl.load(y_ptr + offs_j, mask=mask_j, other=-1)
                h_j = tl.load(h_ptr + offs_j, mask=mask_j, other=0.0)
                w += tl.where(offs_i[:, None] == y_j[None, :], h_j[None, :], 0.0)
        w = tl.where(mask_i[:, None] & mask_j[None, :], w, 0.0)
        y = tl.load(b_ptr + offs_j[:, None] * stride_bj + offs_do[None, :] * stride_bd,
                    mask=mask_j[:, None] & mask_do[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(w, y.to(tl.float32), acc, input_precision="tf32x3")
        else:
            acc = tl.dot(w.to(y.dtype), y, acc)
    acc = acc * scale
    tl.store(out_ptr + offs_i[:, None] * stride_oi + offs_do[None, :] * stride_od, acc,
             mask=mask_i[:, None] & mask_do[None, :])


# Launch configurations, shared by the launchers and the ahead-of-time compile report. Chosen
# from `vlood-fast kernels` so that no specialization spills on sm_80 or sm_90: fp32 runs its
# dots as tf32x3 (three tensor-core passes), which needs narrower D slices and 8 warps.
CONFIGS = {
    "fp32": dict(forward=dict(BLOCK_B=64, BLOCK_K=64, BLOCK_D=16, num_warps=8),
                 backward=dict(BLOCK_I=64, BLOCK_J=32, BLOCK_D=16, BLOCK_DO=64, num_warps=8)),
    "half": dict(forward=dict(BLOCK_B=64, BLOCK_K=64, BLOCK_D=64, num_warps=4),
                 backward=dict(BLOCK_I=64, BLOCK_J=64, BLOCK_D=64, BLOCK_DO=128, num_warps=8)),
}
NUM_STAGES = 3


def _config(dtype: torch.dtype, kind: str, D: int, **overrides) -> dict:
    cfg = dict(CONFIGS["fp32" if dtype == torch.float32 else "half"][kind])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    # small D: do not sweep a 64-wide slice over 8 real columns (tl.dot needs >= 16)
    cfg["BLOCK_D"] = max(16, min(cfg["BLOCK_D"], triton.next_power_of_2(D)))
    if "BLOCK_DO" in cfg:
        cfg["BLOCK_DO"] = max(16, min(cfg["BLOCK_DO"], triton.next_power_of_2(D)))
    return cfg


def _dot_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or interpreting()


def lse_forward(x: torch.Tensor, t: torch.Tensor, scale: float, out: torch.Tensor | None = None,
                **overrides) -> torch.Tensor:
    """lse_b = logsumexp_k(scale * x_b . t_k) as an fp32 [B] tensor (written to ``out`` if given).

    ``overrides`` replace entries of the launch configuration (BLOCK_B, BLOCK_K, ...).
    """
    B, D = x.shape
    K = t.shape[0]
    lse = torch.empty(B, device=x.device, dtype=torch.float32) if out is None else out
    assert lse.shape == (B,) and lse.dtype == torch.float32 and lse.stride(0) == 1
    cfg = _config(x.dtype, "forward", D, **overrides)
    grid = (triton.cdiv(B, cfg["BLOCK_B"]),)
    _lse_forward_kernel[grid](
        x, t, lse, B, K, D, x.stride(0), x.stride(1), t.stride(0), t.stride(1),
        scale * LOG2E, DOT_FP32=_dot_fp32(x.dtype), num_stages=NUM_STAGES, **cfg)
    return lse


def lse_weighted_sum(a: torch.Tensor, b: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                     scale: float, stats_on_rows: bool, h: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None, out: torch.Tensor | None = None,
                     **overrides) -> torch.Tensor:
    """fp32 [NI, D]: scale * sum_j (g P + h onehot(labels))_ij b_j (see the kernel).

    lse, g, h and labels are contiguous vectors indexed by the image rows (a's rows when
    ``stats_on_rows``, b's rows otherwise); h and labels go together or not at all.
    """
    NI, D = a.shape
    NJ = b.shape[0]
    if out is None:
        out = torch.empty(NI, D, device=a.device, dtype=torch.float32)
    assert out.shape == (NI, D) and out.dtype == torch.float32
    cfg = _config(a.dtype, "backward", D, **overrides)
    grid = (triton.cdiv(NI, cfg["BLOCK_I"]), triton.cdiv(D, cfg["BLOCK_DO"]))
    has_labels = labels is not None
    _lse_weighted_sum_kernel[grid](
        a, b, lse, g, h if has_labels else g, labels if has_labels else g, out, NI, NJ, D,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        scale * LOG2E, scale, STATS_ON_I=stats_on_rows, HAS_LABELS=has_labels,
        DOT_FP32=_dot_fp32(a.dtype), num_stages=NUM_STAGES, **cfg)
    return out


def aot_specs():
    """Every specialization the launchers use on a GPU (D >= 64), for ``vlood-fast kernels``."""
    from vlood_fast.aot import KernelSpec
    specs = []
    for dtype in ("fp32", "fp16", "bf16"):
        cfg = CONFIGS["fp32" if dtype == "fp32" else "half"]
        fwd, bwd = dict(cfg["forward"]), dict(cfg["backward"])
        fwd_warps, bwd_warps = fwd.pop("num_warps"), bwd.pop("num_warps")
        dot32 = dtype == "fp32"
        specs.append(KernelSpec(
            "lse_forward", _lse_forward_kernel, dtype,
            signature=dict(x_ptr=f"*{dtype}", t_ptr=f"*{dtype}", lse_ptr="*fp32", B="i32", K="i32",
                           D="i32", stride_xb="i32", stride_xd="i32", stride_tk="i32",
                           stride_td="i32", scale_log2="fp32"),
            constexprs=dict(fwd, DOT_FP32=dot32), num_warps=fwd_warps, num_stages=NUM_STAGES))
        for rows in (True, False):
            for labels in (False, True):
                specs.append(KernelSpec(
                    f"lse_weighted_sum[{'row' if rows else 'column'} pass"
                    f"{', labels' if labels else ''}]", _lse_weighted_sum_kernel, dtype,
                    signature=dict(a_ptr=f"*{dtype}", b_ptr=f"*{dtype}", lse_ptr="*fp32",
                                   g_ptr="*fp32", h_ptr="*fp32", y_ptr="*i64", out_ptr="*fp32",
                                   NI="i32", NJ="i32", D="i32", stride_ai="i32", stride_ad="i32",
                                   stride_bj="i32", stride_bd="i32", stride_oi="i32",
                                   stride_od="i32", scale_log2="fp32", scale="fp32"),
                    constexprs=dict(bwd, STATS_ON_I=rows, HAS_LABELS=labels, DOT_FP32=dot32),
                    num_warps=bwd_warps, num_stages=NUM_STAGES))
    return specs
