"""Exact, device-independent memory accounting for benchmarks and tests."""
import torch


def saved_tensor_bytes(fn, *inputs) -> int:
    """Bytes autograd keeps for backward while ``fn(*inputs)`` runs, inputs excluded.

    Counts each distinct storage once (views of one buffer are one allocation) and leaves out
    storages that belong to ``inputs``: those exist whether or not autograd saves them.
    """
    input_storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in input_storages:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    del out
    return sum(seen.values())


_CHILD_SCRIPT = r"""
import gc, importlib, importlib.util, json, resource, sys
import torch
target, args, warmup, threads = json.loads(sys.argv[1])
torch.set_num_threads(threads)
where, _, name = target.rpartition(":")
if where.endswith(".py"):
    import os
    sys.path.insert(0, os.path.dirname(os.path.abspath(where)))  # the file's sibling modules
    spec = importlib.util.spec_from_file_location("_vlood_child_target", where)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
else:
    module = importlib.import_module(where)
step = getattr(module, name)(*args)
for _ in range(warmup):
    step()
gc.collect()

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None

baseline = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak) to the current RSS
    method = "VmHWM after clear_refs"
except OSError:
    method = "ru_maxrss"
step()
peak = status("VmHWM") if method != "ru_maxrss" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_bytes": peak, "baseline_bytes": baseline, "delta_bytes": peak - baseline,
                  "method": method}))
"""


def child_peak_rss(target: str, *args, warmup: int = 1, threads: int | None = None,
                   timeout: float | None = None) -> dict:
    """Peak resident-memory growth of one call of a benchmark step, measured in a fresh process.

    ``target`` is ``"path/to/file.py:factory"`` or ``"package.module:factory"``; the child
    imports it, calls ``factory(*args)`` (JSON-serializable args) which builds the inputs and
    returns a zero-argument ``step``, runs ``step`` ``warmup`` times (thread pools, lazy
    initialization), then takes ``baseline`` = current RSS, resets the kernel's high-water mark
    (``/proc/self/clear_refs``; falls back to ``getrusage`` ``ru_maxrss``, which then also
    covers the warm-up's identical peak), runs ``step`` once and reads the peak. Inputs and
    imports are in the baseline; everything the step allocates (outputs, gradients,
    temporaries) is in ``delta_bytes``, provided ``step`` releases what it allocates before
    returning (e.g. sets ``.grad`` to None at its end), so the warm-up leaves the baseline
    unchanged. The child runs with glibc's mmap threshold pinned at 64 KiB
    (``MALLOC_MMAP_THRESHOLD_``): every block of that size or more is mapped on allocation and
    unmapped on free, so RSS follows live memory instead of heap memory the warm-up left
    behind (without it, small workloads can read as zero or negative growth). CPU only.

    Returns ``{"peak_bytes", "baseline_bytes", "delta_bytes", "method"}``.

    Example::

        mem = child_peak_rss("benchmarks/bench_synthesis.py:make_step", "torch", 1000, 1000)
        print(mem["delta_bytes"] / 2**20, "MB")
    """
    import json
    import subprocess
    import sys

    import os

    payload = json.dumps([target, list(args), int(warmup), int(threads or torch.get_num_threads())])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, "-c", _CHILD_SCRIPT, payload], capture_output=True,
                          text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"child process for {target}{tuple(args)} failed "
                           f"(exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
