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


HOT_PATHS = {
    "similarity_lse (CE fwd+bwd)": (similarity_lse, [(256, 1000, 512), (4096, 21843, 512)]),
}


def _mb(n):
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def table(dtypes=("bf16", "fp32")) -> str:
    lines = ["| hot path | shape | dtype | fused: GFLOP / MB moved | reference: GFLOP / MB moved "
             "| predicted fused | predicted reference | predicted speedup | saved for backward: fused / reference |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, (model, shapes) in HOT_PATHS.items():
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
                    f"| {_mb(saved_fused)} / {_mb(saved_ref)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
