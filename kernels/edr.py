"""EDR penalty (CRoFT): the row and column passes over the N x K similarity tiles.

One kernel serves both passes and both directions. For "own" rows x_i (u for the row pass,
v for the column pass) and "other" rows y_j, with ``P_ij = exp(x_i . y_j / T)``:

- forward:  ``out_p[i] = sum_j P_ij y_j``
- backward: also ``m_ij = (xdot_i . y_j + x_i . ydot_j) / T``, ``Q = c_phi P m`` and
  ``out_q[i] = sum_j Q_ij y_j``, ``out_pd[i] = sum_j P_ij ydot_j``.

m is symmetric under swapping (x, xdot) with (y, ydot), so the column pass is the row pass
with the operands swapped. Each program owns a block of own rows and a slice of D, streams
the other side in tiles, recomputes its P (and m) tile from the inputs, and keeps three fp32
accumulators: no N x K matrix, no atomics, deterministic. Inputs are the fp32 adapted rows
(computed in torch), so dots run as tf32x3 on GPU.
"""
import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _edr_pass_kernel(x_ptr, xd_ptr, y_ptr, yd_ptr, out_q_ptr, out_pd_ptr, out_p_ptr,
                     NI, NJ, D, stride_x, stride_y, stride_o, inv_t_log2, m_scale,
                     BACKWARD: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr):
    pid_i = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < NI
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    mask_do = offs_do < D
    acc_p = tl.zeros([BLOCK_I, BLOCK_DO], dtype=tl.float32)
    acc_q = tl.zeros([BLOCK_I, BLOCK_DO], dtype=tl.float32)
    acc_pd = tl.zeros([BLOCK_I, BLOCK_DO], dtype=tl.float32)
    for j0 in range(0, NJ, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < NJ
        s = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
        m = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            x_off = offs_i[:, None] * stride_x + offs_d[None, :]
            y_off = offs_j[None, :] * stride_y + offs_d[:, None]
            x_mask = mask_i[:, None] & mask_d[None, :]
            y_mask = mask_j[None, :] & mask_d[:, None]
            x = tl.load(x_ptr + x_off, mask=x_mask, other=0.0)
            y = tl.load(y_ptr + y_off, mask=y_mask, other=0.0)   # [BLOCK_D, BLOCK_J]
            s = tl.dot(x, y, s, input_precision="tf32x3")
            if BACKWARD:
                xd = tl.load(xd_ptr + x_off, mask=x_mask, other=0.0)
                yd = tl.load(yd_ptr + y_off, mask=y_mask, other=0.0)
                m = tl.dot(xd, y, m, input_precision="tf32x3")
                m = tl.dot(x, yd, m, input_precision="tf32x3")
        p = tl.exp2(s * inv_t_log2)
        p = tl.where(mask_i[:, None] & mask_j[None, :], p, 0.0)
        yo_off = offs_j[:, None] * stride_y + offs_do[None, :]
        yo_mask = mask_j[:, None] & mask_do[None, :]
        y_out = tl.load(y_ptr + yo_off, mask=yo_mask, other=0.0)   # [BLOCK_J, BLOCK_DO]
        acc_p = tl.dot(p, y_out, acc_p, input_precision="tf32x3")
        if BACKWARD:
            q = p * m * m_scale
            acc_q = tl.dot(q, y_out, acc_q, input_precision="tf32x3")
            yd_out = tl.load(yd_ptr + yo_off, mask=yo_mask, other=0.0)
            acc_pd = tl.dot(p, yd_out, acc_pd, input_precision="tf32x3")
    o_off = offs_i[:, None] * stride_o + offs_do[None, :]
    o_mask = mask_i[:, None] & mask_do[None, :]
    tl.store(out_p_ptr + o_off, acc_p, mask=o_mask)
    if BACKWARD:
        tl.store(out_q_ptr + o_off, acc_q, mask=o_mask)
        tl.store(out_pd_ptr + o_off, acc_pd, mask=o_mask)


# Launch configuration (shared with the ahead-of-time report): chosen with `vlood-fast kernels`
# so that neither direction spills on sm_80 / sm_90.
# The backward keeps three accumulators, hence the narrower row block. Cost of the D slicing:
# each of the D / BLOCK_DO programs of a row block recomputes its P (and m) tiles.
CONFIGS = {
    "forward": dict(BLOCK_I=64, BLOCK_J=32, BLOCK_D=16, BLOCK_DO=64, num_warps=8),
    "backward": dict(BLOCK_I=16, BLOCK_J=32, BLOCK_D=32, BLOCK_DO=64, num_warps=4),
}
NUM_STAGES = 2


def _config(kind, D, **overrides):
    cfg = dict(CONFIGS[kind])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    cfg["BLOCK_D"] = max(16, min(cfg["BLOCK_D"], triton.next_power_of_2(D)))
    cfg["BLOCK_DO"] = max(16, min(cfg["BLOCK_DO"], triton.next_power_of_2(D)))
    return cfg


def edr_pass(own: torch.Tensor, other: torch.Tensor, inv_t: float, own_dot=None, other_dot=None,
             cphi: float = 1.0, out=None, **overrides):
    """Forward: ``sum_j P_ij other_j`` [NI, D]. Backward (dots given): (Q-sum, P.other_dot-sum,
    P-sum), each [NI, D] fp32. All inputs contiguous fp32 [*, D]; ``out`` optionally gives the
    output buffers (views with unit column stride)."""
    backward = own_dot is not None
    NI, D = own.shape
    NJ = other.shape[0]
    for t in (own, other) + ((own_dot, other_dot) if backward else ()):
        assert t.dtype == torch.float32 and t.stride(1) == 1
    if backward:
        assert own_dot.stride() == own.stride() and other_dot.stride() == other.stride()
    n_out = 3 if backward else 1
    if out is None:
        out = tuple(torch.empty(NI, D, device=own.device, dtype=torch.float32) for _ in range(n_out))
    assert len(out) == n_out and all(o.stride() == out[0].stride() and o.stride(1) == 1 for o in out)
    cfg = _config("backward" if backward else "forward", D, **overrides)
    grid = (triton.cdiv(NI, cfg["BLOCK_I"]), triton.cdiv(D, cfg["BLOCK_DO"]))
    q, pd, p = out if backward else (out[0], out[0], out[0])
    _edr_pass_kernel[grid](
        own, own_dot if backward else own, other, other_dot if backward else other, q, pd, p,
        NI, NJ, D, own.stride(0), other.stride(0), p.stride(0), inv_t * LOG2E, cphi * inv_t,
        BACKWARD=backward, num_stages=NUM_STAGES, **cfg)
    return (q, pd, p) if backward else p


def aot_specs():
    """The two specializations the launcher uses on a GPU, for ``vlood-fast kernels``."""
    from vlood_fast.aot import KernelSpec
    specs = []
    for kind in ("forward", "backward"):
        cfg = dict(CONFIGS[kind])
        warps = cfg.pop("num_warps")
        specs.append(KernelSpec(
            f"edr_pass[{kind}]", _edr_pass_kernel, "fp32",
            signature=dict(x_ptr="*fp32", xd_ptr="*fp32", y_ptr="*fp32", yd_ptr="*fp32",
                           out_q_ptr="*fp32", out_pd_ptr="*fp32", out_p_ptr="*fp32", NI="i32",
                           NJ="i32", D="i32", stride_x="i32", stride_y="i32", stride_o="i32",
                           inv_t_log2="fp32", m_scale="fp32"),
            constexprs=dict(cfg, BACKWARD=kind == "backward"), num_warps=warps,
            num_stages=NUM_STAGES))
    return specs
