"""Ahead-of-time compilation of every Triton kernel for NVIDIA targets, without a GPU.

``triton.compile`` lowers a kernel to PTX and a cubin for a given ``GPUTarget``; the
``cuobjdump`` shipped in the triton wheel then reports registers, stack (spills) and shared
memory. Tensor-core use is read from the PTX (``mma`` on sm_80, ``wgmma`` on sm_90).
Each module in ``vlood_fast.kernels`` lists its specializations in ``aot_specs()``.
"""
import dataclasses
import importlib
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

KERNEL_MODULES = ("similarity_lse", "edr", "synthesis")
TARGETS = (80, 90)


@dataclasses.dataclass
class KernelSpec:
    name: str
    kernel: object  # a triton JITFunction
    dtype: str
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3


@dataclasses.dataclass
class CompileResult:
    name: str
    dtype: str
    target: int
    registers: int | None = None
    stack_bytes: int | None = None
    local_bytes: int | None = None
    shared_bytes: int | None = None
    tensor_cores: str = ""
    seconds: float = 0.0
    error: str | None = None

    @property
    def spills(self) -> bool:
        return bool(self.stack_bytes or self.local_bytes)


def all_specs():
    specs = []
    for module in KERNEL_MODULES:
        try:
            mod = importlib.import_module(f"vlood_fast.kernels.{module}")
        except ModuleNotFoundError:
            continue
        if hasattr(mod, "aot_specs"):
            specs.extend(mod.aot_specs())
    return specs


def _cuobjdump() -> str:
    import triton
    return str(pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k: int(v) for k, v in fields.items()}


def compile_spec(spec: KernelSpec, capability: int) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = CompileResult(spec.name, spec.dtype, capability)
    start = time.perf_counter()
    try:
        signature = dict(spec.signature)
        signature.update({k: "constexpr" for k in spec.constexprs})
        source = ASTSource(spec.kernel, signature, constexprs=dict(spec.constexprs))
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                  options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
        res = _resources(compiled.asm["cubin"])
        ptx = compiled.asm["ptx"]
        result.registers, result.stack_bytes = res.get("REG"), res.get("STACK")
        result.local_bytes = res.get("LOCAL")
        # dynamic shared memory (the pipelined tiles) + static
        result.shared_bytes = compiled.metadata.shared + res.get("SHARED", 0)
        result.tensor_cores = "wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "none")
    except Exception as exc:  # report, don't hide: the caller decides what a failure means
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    result.seconds = time.perf_counter() - start
    return result


def compile_all(targets=TARGETS, progress=None):
    """Compile every kernel specialization for every target; returns CompileResults."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("ahead-of-time compilation needs real JIT kernels: unset "
                           "TRITON_INTERPRET (vlood-fast kernels does this for you)")
    jobs = [(spec, cap) for spec in all_specs() for cap in targets]
    results = []
    for spec, cap in (progress(jobs) if progress else jobs):
        results.append(compile_spec(spec, cap))
    return results


def format_table(results) -> str:
    head = ("| kernel | dtype | target | registers | stack (spill) B | shared KB | tensor cores | status |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = [head]
    for r in results:
        status = "ok" if r.error is None else f"FAILED: {r.error}"
        shared = f"{r.shared_bytes / 1024:.1f}" if r.shared_bytes is not None else "-"
        rows.append(f"| {r.name} | {r.dtype} | sm_{r.target} | {r.registers if r.registers is not None else '-'} "
                    f"| {r.stack_bytes if r.stack_bytes is not None else '-'} | {shared} | {r.tensor_cores or '-'} | {status} |")
    return "\n".join(rows)


def run_in_clean_process(argv=()) -> int:
    """Re-run ``python -m vlood_fast.aot`` with TRITON_INTERPRET removed from the environment."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.call([sys.executable, "-m", "vlood_fast.aot", *argv], env=env)


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="vlood-fast kernels",
                                     description="Compile every Triton kernel for sm_80 and sm_90 "
                                                 "without a GPU and report resources.")
    parser.add_argument("--target", type=int, action="append", choices=TARGETS,
                        help="compute capability (repeatable; default: 80 and 90)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return run_in_clean_process(argv or sys.argv[1:])
    from tqdm import tqdm
    results = compile_all(tuple(args.target or TARGETS),
                          progress=lambda jobs: tqdm(jobs, desc="compiling", unit="kernel", file=sys.stderr))
    print(format_table(results))
    failed = [r for r in results if r.error]
    spilled = [r for r in results if r.error is None and r.spills]
    print(f"\n{len(results) - len(failed)}/{len(results)} compiled; "
          f"{len(spilled)} spill registers to local memory")
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
