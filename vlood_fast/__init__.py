"""vlood_fast: fast, memory-lean kernels for robust CLIP fine-tuning (CRoFT, OGEN).

Every hot path has three implementations (reference / torch / triton) chosen per call by
``vlood_fast.dispatch.resolve_backend``: CUDA tensors run Triton kernels, CPU tensors the
chunked torch path, and ``VLOOD_FAST_BACKEND=reference|torch|triton`` overrides both.
"""
from .dispatch import BACKENDS, resolve_backend
from .ops.similarity_lse import clip_cross_entropy, energy_score, similarity_logsumexp
from .cache import FeatureCache, make_key, weights_fingerprint
from .ood import ood_metrics, ood_score
from .ops.edr import edr_penalty
from .ops import library as _library  # noqa: F401  (registers the torch.compile custom ops)
from .croft import CroftAdapter, CroftLoss, ShiftGenerator, croft_ood_score
from .ogen import ClassStatistics, OgenGenerator, OgenLoss, class_neighbours
from .ops.synthesis import topk_neighbours
from .teacher import LocalMeanTeacher, distillation_loss
# vlood_fast.clip (open_clip glue) and vlood_fast.data are imported on demand: open_clip is optional.

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "CroftAdapter",
    "CroftLoss",
    "ShiftGenerator",
    "croft_ood_score",
    "edr_penalty",
    "ClassStatistics",
    "FeatureCache",
    "LocalMeanTeacher",
    "OgenGenerator",
    "OgenLoss",
    "class_neighbours",
    "clip_cross_entropy",
    "distillation_loss",
    "energy_score",
    "make_key",
    "ood_metrics",
    "ood_score",
    "resolve_backend",
    "similarity_logsumexp",
    "topk_neighbours",
    "weights_fingerprint",
]
