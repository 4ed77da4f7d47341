"""The real GPU table, in one command, for anyone with an NVIDIA GPU.

    .venv/bin/python benchmarks/gpu.py --out gpu_results      # needs CUDA

For every hot path and shape: a correctness check of the triton path against the fp64
reference first (the run stops if it fails), then forward+backward medians from
``triton.testing.do_bench`` and peak CUDA memory above the inputs for each provider
(reference, compiled reference, torch, triton). Writes ``<out>/gpu.json`` and ``<out>/gpu.md``.
"""
import argparse
import json
import pathlib
import sys

import torch
import torch.nn.functional as F


def _lse_case(B, K, D, dtype):
    import vlood_fast
    from vlood_fast.reference import energy as reference

    g = torch.Generator(device="cuda").manual_seed(0)
    x = F.normalize(torch.randn(B, D, device="cuda", generator=g), dim=1).to(dtype).requires_grad_()
    t = F.normalize(torch.randn(K, D, device="cuda", generator=g), dim=1).to(dtype).requires_grad_()
    y = torch.randint(0, K, (B,), device="cuda", generator=g)

    def make(provider):
        if provider == "compiled":
            fn = torch.compile(lambda a, b: reference.clip_cross_entropy(a, b, y))
            return lambda: fn(x, t)
        return lambda: vlood_fast.clip_cross_entropy(x, t, y, backend=provider)

    def check():
        ref = reference.clip_cross_entropy(x.double(), t.double(), y)
        got = vlood_fast.clip_cross_entropy(x, t, y, backend="triton")
        plain = reference.clip_cross_entropy(x, t, y)
        err, err_plain = (got.double() - ref).abs().item(), (plain.double() - ref).abs().item()
        return err <= err_plain + 1e-3 * ref.abs().item(), f"|err| {err:.2e} (plain PyTorch {err_plain:.2e})"

    return make, (x, t), check


def _edr_case(N, K, D, dtype):
    import vlood_fast
    from vlood_fast.reference.edr import edr_penalty as reference

    g = torch.Generator(device="cuda").manual_seed(0)
    z = F.normalize(torch.randn(N, D, device="cuda", generator=g), dim=1).to(dtype).requires_grad_()
    t = F.normalize(torch.randn(K, D, device="cuda", generator=g), dim=1).to(dtype)
    eye = torch.eye(D, device="cuda", dtype=dtype)
    wi, wt = eye.clone().requires_grad_(), eye.clone().requires_grad_()

    def make(provider):
        if provider == "compiled":
            raise RuntimeError("torch.compile does not support the reference's double backward")
        return lambda: vlood_fast.edr_penalty(z, t, wi, wt, backend=provider)

    def check():
        ref = reference(z.double(), t.double(), wi.double(), wt.double())
        got = vlood_fast.edr_penalty(z, t, wi, wt, backend="triton").double()
        err = ((got - ref).abs() / ref.abs()).item()
        return err <= 1e-3, f"relative error {err:.2e}"

    return make, (z, wi, wt), check


def _synthesis_case(U, C, D, dtype, k=3):
    import vlood_fast

    g = torch.Generator(device="cuda").manual_seed(0)
    q, bk, bv = (F.normalize(torch.randn(n, D, device="cuda", generator=g), dim=1).to(dtype).requires_grad_()
                 for n in (U, C, C))
    gen = vlood_fast.OgenGenerator(D).to("cuda", dtype).eval()

    def make(provider):
        if provider == "compiled":
            raise RuntimeError("the discrete top-k selection is not compiled here")
        return lambda: gen.synthesize(q, bk, bv, k, backend=provider)[0].float().square().sum()

    def check():
        ref, ref_idx = gen.synthesize(q, bk, bv, k, backend="reference")
        got, idx = gen.synthesize(q, bk, bv, k, backend="triton")
        err = (got.float() - ref.float()).abs().max().item()
        return bool((idx == ref_idx).float().mean() > 0.99) and err < 5e-2, f"max |err| {err:.2e}"

    return make, (q, bk, bv), check


CASES = {
    "cross_entropy": (_lse_case, [(256, 1000, 512), (4096, 21843, 512)]),
    "edr_penalty": (_edr_case, [(64, 400, 512), (256, 21843, 512)]),
    "ogen_synthesis": (_synthesis_case, [(1000, 1000, 512), (21843, 21843, 512)]),
}
PROVIDERS = ("reference", "compiled", "torch", "triton")


def _measure(make, leaves, provider):
    from triton.testing import do_bench

    loss_fn = make(provider)

    def step():
        for leaf in leaves:
            leaf.grad = None
        loss_fn().backward()

    step()  # warm-up / compile
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return do_bench(step, return_mode="median") * 1e-3, peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_results")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    rows = []
    for op, (case, shapes) in CASES.items():
        for shape in shapes:
            make, leaves, check = case(*shape, dtype)
            ok, detail = check()
            print(f"{op} {shape}: correctness {'ok' if ok else 'FAILED'} ({detail})")
            if not ok:
                sys.exit(1)
            for provider in PROVIDERS:
                try:
                    seconds, peak = _measure(make, leaves, provider)
                except Exception as exc:  # e.g. torch.compile unavailable: report, continue
                    print(f"  {provider}: skipped ({type(exc).__name__}: {exc})")
                    continue
                rows.append(dict(op=op, shape=list(shape), dtype=args.dtype, provider=provider,
                                 median_s=seconds, peak_bytes=peak, gpu=torch.cuda.get_device_name()))
                print(f"  {provider:<10} {seconds * 1e3:9.3f} ms  peak {peak / 2**20:9.1f} MB")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(rows, indent=1))
    lines = [f"Measured on {torch.cuda.get_device_name()}, {args.dtype}, torch {torch.__version__}.", "",
             "| op | shape | provider | median | vs reference | peak memory |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ref = next(q for q in rows if q["op"] == r["op"] and q["shape"] == r["shape"]
                   and q["provider"] == "reference")
        lines.append(f"| {r['op']} | {' x '.join(map(str, r['shape']))} | {r['provider']} "
                     f"| {r['median_s'] * 1e3:.3f} ms | {ref['median_s'] / r['median_s']:.2f}x "
                     f"| {r['peak_bytes'] / 2**20:.1f} MB |")
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")


if __name__ == "__main__":
    main()
