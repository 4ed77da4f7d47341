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
