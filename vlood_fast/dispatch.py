"""Which implementation runs: reference, torch or triton.

Order of precedence: an explicit ``backend=`` argument, then the ``VLOOD_FAST_BACKEND``
environment variable, then the device (CUDA -> triton, anything else -> torch).
"""
import os

import torch

BACKENDS = ("reference", "torch", "triton")
ENV_VAR = "VLOOD_FAST_BACKEND"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(device: torch.device, dtype: torch.dtype, backend: str | None = None) -> str:
    """The backend that runs an op on tensors of this device and dtype.

    Args:
        device: the inputs' device; dtype: their dtype (fp64 on "triton" falls back to "torch":
            the kernels accumulate in fp32, fp64 is a checking dtype).
        backend: ``"reference"``, ``"torch"``, ``"triton"`` or None (then ``VLOOD_FAST_BACKEND``,
            then the device: CUDA -> "triton", anything else -> "torch").
    Returns: one of ``BACKENDS``. Raises ``ValueError`` for an unknown name and
    ``RuntimeError`` for "triton" without triton, or on CPU tensors without ``TRITON_INTERPRET=1``.

    Example::

        resolve_backend(torch.device("cpu"), torch.float32)           # "torch"
        resolve_backend(torch.device("cpu"), torch.float32, "reference")  # "reference"
    """
    requested = backend if backend is not None else os.environ.get(ENV_VAR) or None
    if requested is not None and requested not in BACKENDS:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested is None:
        requested = "triton" if device.type == "cuda" and triton_available() else "torch"
    if requested == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' requested but triton is not installed")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(f"backend 'triton' needs CUDA tensors (got {device}); set "
                               f"TRITON_INTERPRET=1 before importing vlood_fast to run kernels on CPU")
        if dtype == torch.float64:
            # The kernels accumulate in fp32; fp64 is a checking dtype, served by the torch path.
            return "torch"
    return requested
