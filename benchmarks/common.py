"""Shared benchmark machinery: providers, modes, environment and memory records.

Every benchmark row carries ``extra_info`` with provider, mode, op, shape, device, bytes saved
for backward beyond the inputs, and the environment, so ``benchmarks/report.py`` can build the
tables from the ``--benchmark-json`` output alone.
"""
import os
import platform

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODES = ("forward", "backward", "forward+backward")


def providers(compiled=True):
    """reference, compiled reference (torch.compile of the reference), torch, triton (CUDA)."""
    names = ["reference"] + (["compiled"] if compiled else []) + ["torch"]
    return names + (["triton"] if DEVICE == "cuda" else [])


def environment() -> dict:
    env = dict(torch=torch.__version__, python=platform.python_version(), device=DEVICE,
               threads=torch.get_num_threads(), machine=platform.machine())
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    if DEVICE == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    else:
        env["cpu"] = _cpu_name()
        env["cores"] = os.cpu_count()
    return env


def _cpu_name() -> str:
    """Model name plus family/model numbers: hosts sold as the same "AMD EPYC" differ by 2-3x in
    GEMM rate (family 23 model 1, Zen 1, runs AVX2 FMAs at half width), which moves every ratio."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor()
    name = fields.get("model name", platform.processor())
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    return name


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


_COMPILED = {}


def compiled(fn, key):
    """torch.compile of a reference function, cached per (function, shape) key."""
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=False)
    return _COMPILED[key]


def run_modes(benchmark, mode, forward, tensors, rounds, warmup=1):
    """Time ``mode`` of ``forward()`` (returns a scalar loss) w.r.t. leaf ``tensors``."""
    def clear():
        for t in tensors:
            t.grad = None

    if mode == "forward":
        def step():
            out = forward()
            sync()
            return out
        return benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup)
    if mode == "backward":
        def setup():
            clear()
            return (forward(),), {}

        def step(loss):
            loss.backward()
            sync()
        return benchmark.pedantic(step, setup=setup, rounds=rounds, warmup_rounds=warmup)

    def step():
        clear()
        forward().backward()
        sync()
    return benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup)


def record(benchmark, *, group, provider, mode, op, shape, saved_bytes=None, **extra):
    benchmark.group = group
    benchmark.extra_info.update(provider=provider, mode=mode, op=op, shape=list(shape),
                                device=DEVICE, env=environment(), **extra)
    if saved_bytes is not None:
        benchmark.extra_info["saved_bytes"] = saved_bytes
