"""Up-front argument checks shared by every public op.

Errors name the argument and what was expected, so a shape bug surfaces at the call site
instead of deep inside a kernel launch.
"""
import math
import os
from numbers import Real

import torch

CHECK_FINITE_ENV = "VLOOD_FAST_CHECK_FINITE"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_matrix(name: str, tensor, dims: str = "[N, D]") -> torch.Tensor:
    """A non-empty floating 2-D tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {dims}, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {tensor.dtype}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must have shape {dims}, got {tuple(tensor.shape)}")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty with shape {dims}, got {tuple(tensor.shape)}")
    check_finite(name, tensor)
    return tensor


def finite_checks_enabled() -> bool:
    return os.environ.get(CHECK_FINITE_ENV, "0") == "1"


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """With VLOOD_FAST_CHECK_FINITE=1, reject NaN/Inf. Off by default: on CUDA the check is a
    device-to-host sync per tensor. Skipped while torch.compile traces (it would break the
    graph); the custom ops of ops/library.py run it when the compiled graph runs."""
    if finite_checks_enabled() and not torch.compiler.is_compiling() \
            and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or Inf values ({CHECK_FINITE_ENV}=1 is set)")


def check_same_dim(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} has feature dim {a.shape[1]} but {name_b} has {b.shape[1]}; "
                         f"both must be [*, D] with the same D")


def check_compatible(**tensors: torch.Tensor) -> None:
    """All tensors on one device and of one dtype."""
    names = list(tensors)
    first = tensors[names[0]]
    for name in names[1:]:
        other = tensors[name]
        if other.device != first.device:
            raise ValueError(f"{name} is on {other.device} but {names[0]} is on {first.device}; "
                             f"all inputs must be on one device")
        if other.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {other.dtype} but {names[0]} has {first.dtype}; "
                            f"cast them to one dtype")


def check_labels(labels, batch: int, num_classes: int, device: torch.device) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an integer torch.Tensor of shape [{batch}], "
                        f"got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape [{batch}] (one per image row), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but the features are on {device}")
    if not torch.compiler.is_compiling():
        # reading values while torch.compile traces would break the graph: the custom ops of
        # ops/library.py run this check when the compiled graph runs instead
        check_label_range(labels, num_classes)
    return labels.long()


def check_label_range(labels: torch.Tensor, num_classes: int) -> None:
    """Every label in [0, num_classes): a device-to-host read (one sync on CUDA)."""
    if labels.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(labels)).tolist()
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) (the number of text rows), "
                         f"got values in [{lo}, {hi}]")


def check_positive(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name} must be a positive number, got a tensor of shape {tuple(value.shape)}")
        if value.requires_grad:
            raise TypeError(f"{name} must be a plain number; for a learnable scale multiply the "
                            f"image features by it and pass {name}=1.0")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__}")
    value = float(value)
    # comparisons rather than math.isfinite: they also trace when torch.compile hands in a
    # symbolic float (dynamic=True, or a value that changed between calls)
    if not (0 < value < math.inf):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
