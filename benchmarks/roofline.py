"""Roofline PREDICTIONS for an NVIDIA H100 SXM: not measurements.

    .venv/bin/python benchmarks/roofline.py            # markdown table for the README

For each hot path at each benchmark shape: FLOPs and bytes moved by the fused kernels (each
input read once per pass, each output written once) and by the reference's unfused op
sequence (materialized B x K logits and the intermediates autograd saves), the predicted time
max(FLOPs / compute ceiling, bytes / bandwidth) per launch, summed, and the predicted speedup.

Ceilings: published H100 SXM5 peaks (HBM3 3.35 TB/s; dense BF16 tensor core 989 TFLOP/s,
TF32 495, FP32 SIMT 67) derated to what tuned kernels typically reach: 90% of bandwidth,
70% of tensor-core peak, 80% of SIMT peak. fp32 inputs: our kernels run tf32x3 (three TF32
tensor-core passes); the reference's fp32 GEMMs run on SIMT (PyTorch's default
``allow_tf32=False``). Real numbers come from ``benchmarks/gpu.py`` on a GPU.
"""
import dataclasses

BANDWIDTH = 3.35e12 * 0.90
TENSOR_BF16 = 989e12 * 0.70
TENSOR_TF32X3 = 495e12 * 0.70 / 3
SIMT_FP32 = 67e12 * 0.80
LAUNCH = 4e-6  # per kernel launch; dominates at small shapes


@dataclasses.dataclass
class Launch:
    """One kernel launch: its FLOPs, bytes and the compute ceiling it runs against."""
    name: str
    flops: float
    bytes: float
    rate: float

    @property
    def seconds(self) -> float:
        return LAUNCH + max(self.flops / self.rate, self.bytes / BANDWIDTH)


def _gemm_rate(dtype, fused):
    if dtype == "bf16":
        return TENSOR_BF16
    return TENSOR_TF32X3 if fused else SIMT_FP32


def similarity_lse(B, K, D, dtype="bf16"):
    """Cross-entropy forward + backward. Fused: 1 forward, 2 recomputing backward passes."""
    e = 2 if dtype == "bf16" else 4
    inputs = (B + K) * D * e
    rate = _gemm_rate(dtype, fused=True)
    fused = [
        Launch("forward (S, online lse)", 2 * B * K * D, inputs + 4 * B, rate),
        Launch("row pass (S again, dx)", 4 * B * K * D, inputs + 12 * B + 4 * B * D, rate),
        Launch("column pass (S again, dt)", 4 * B * K * D, inputs + 12 * B + 4 * K * D, rate),
    ]
    logits = B * K * e
    ref_rate = _gemm_rate(dtype, fused=False)
    reference = [
        Launch("GEMM x t^T -> logits", 2 * B * K * D, inputs + logits, ref_rate),
        Launch("log_softmax", 5 * B * K, 2 * logits, ref_rate),
        Launch("nll + log_softmax backward", 5 * B * K, 3 * logits, ref_rate),
        Launch("GEMM dlogits t -> dx", 2 * B * K * D, logits + K * D * e + B * D * e, ref_rate),
        Launch("GEMM dlogits^T x -> dt", 2 * B * K * D, logits + B * D * e + K * D * e, ref_rate),
    ]
    # saved for backward beyond the inputs: per-row lse vs the log-softmax output
    return fused, reference, 4 * B, logits


def edr(N, K, D, dtype="fp32", block_do_fwd=64, block_do_bwd=64):
    """EDR fwd+bwd, text frozen (CRoFT's case). The adapted rows are fp32 whatever the input,
    so every tile product is tf32x3. Each of the D / BLOCK_DO programs of a row block
    recomputes its S (forward) or S and m (backward) tiles: that factor is in the FLOPs."""
    rate, e = TENSOR_TF32X3, 4
    sf, sb = D // block_do_fwd, D // block_do_bwd
    nk = N * K * D
    rows = (N + K) * D * e
    fused = [
        Launch("GEMMs e = g W^T, a = z W^T", 2 * K * D * D + 2 * N * D * D, (K + N) * D * e * 2, rate),
        Launch("row pass (S, P v)", (2 * sf + 2) * nk, rows + N * D * e, rate),
        Launch("column pass (S, P^T u)", (2 * sf + 2) * nk, rows + K * D * e, rate),
        Launch("GEMMs beta^T g, alpha^T z", 2 * K * D * D + 2 * N * D * D, rows * 2, rate),
        Launch("GEMMs edot = g H^T, adot", 2 * K * D * D + 2 * N * D * D, rows * 2, rate),
        Launch("row pass (S, m, Q v, P vdot)", (6 * sb + 4) * nk, 2 * rows + 2 * N * D * e, rate),
        Launch("column pass (S, m, three sums)", (6 * sb + 6) * nk, 2 * rows + 3 * K * D * e, rate),
        Launch("GEMMs grad W_t = ge^T g, grad z, grad W_i", 2 * K * D * D + 6 * N * D * D, rows * 3, rate),
    ]
    nk_bytes = N * K * e
    ref_rate = SIMT_FP32
    reference = [
        Launch("GEMMs: adapt z and g at W + delta", 2 * K * D * D + 2 * N * D * D, rows * 2, ref_rate),
        Launch("S, exp, sum (Phi)", 2 * nk, rows + 3 * nk_bytes, ref_rate),
        Launch("grad Phi -> u, v (2 GEMMs), normalize backward", 4 * nk, 4 * nk_bytes + 4 * rows, ref_rate),
        Launch("grad -> delta (2 GEMMs, [D,K]x[K,D])", 2 * K * D * D + 2 * N * D * D, 2 * rows, ref_rate),
        Launch("double backward: N x K passes (~4 GEMMs)", 8 * nk, 8 * nk_bytes + 6 * rows, ref_rate),
        Launch("double backward: D x D side (~3 [K,D]x[D,D])", 6 * K * D * D, 8 * rows, ref_rate),
    ]
    return fused, reference, (D * D + N * D) * e, 6 * nk_bytes + 4 * K * D * e


def synthesis(U, C, D, k=3, dtype="bf16"):
    """OGEN synthesis fwd+bwd: the U x C search dominates; the fused kernel keeps a running
    top-k instead of writing the U x C matrix; projections/FFN are GEMMs on U k rows."""
    e = 2 if dtype == "bf16" else 4
    rate = TENSOR_BF16 if dtype == "bf16" else TENSOR_TF32X3
    proj = 2 * U * D * D * (1 + 2 * k + 1 + 2)   # q, gathered k/v, out, FFN (2 layers)
    fused = [
        Launch("search + top-k + attention (one kernel)", 2 * U * C * D, (U + C) * D * e + U * k * 8, rate),
        Launch("projections and FFN (GEMMs), forward", proj, 4 * U * D * e, rate),
        Launch("backward: attention recomputed, projections", 2 * proj, 8 * U * D * e, rate),
    ]
    sim = U * C * 4
    ref_rate = TENSOR_BF16 if dtype == "bf16" else SIMT_FP32
    reference = [
        Launch("similarity GEMM -> U x C matrix", 2 * U * C * D, (U + C) * D * e + sim, ref_rate),
        Launch("topk over U x C", U * C, sim, ref_rate),
        Launch("gather + projections + FFN, forward", proj, 6 * U * k * D * e, ref_rate),
        Launch("backward (autograd)", 2 * proj, 12 * U * k * D * e, ref_rate),
    ]
    return fused, reference, U * k * 8, 0


HOT_PATHS = {
    "similarity_lse (CE fwd+bwd)": (similarity_lse, [(256, 1000, 512), (4096, 21843, 512)], ("bf16", "fp32")),
    "EDR penalty (fwd+bwd, text frozen)": (edr, [(64, 400, 512), (256, 21843, 512)], ("fp32",)),
    "OGEN synthesis (fwd+bwd, k=3)": (synthesis, [(1000, 1000, 512), (21843, 21843, 512)], ("bf16", "fp32")),
}


def _mb(n):
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def table() -> str:
    lines = ["| hot path | shape | dtype | fused: GFLOP / MB moved | reference: GFLOP / MB moved "
             "| predicted fused | predicted reference | predicted speedup | saved for backward: fused / reference |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, (model, shapes, dtypes) in HOT_PATHS.items():
        for shape in shapes:
            for dtype in dtypes:
                fused, reference, saved_fused, saved_ref = model(*shape, dtype=dtype)
                tf, tr = sum(l.seconds for l in fused), sum(l.seconds for l in reference)
                ff, fb = sum(l.flops for l in fused), sum(l.bytes for l in fused)
                rf, rb = sum(l.flops for l in reference), sum(l.bytes for l in reference)
                lines.append(
                    f"| {name} | {' x '.join(map(str, shape))} | {dtype} "
                    f"| {ff / 1e9:.1f} / {fb / 2**20:.0f} | {rf / 1e9:.1f} / {rb / 2**20:.0f} "
                    f"| {tf * 1e3:.3f} ms | {tr * 1e3:.3f} ms | {tr / tf:.2f}x "
                    f"| {_mb(saved_fused)} / {_mb(saved_ref) if saved_ref else 'see CPU table'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
