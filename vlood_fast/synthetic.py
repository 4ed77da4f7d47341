"""A synthetic CLIP-like feature world: the demo's data, and a test bed that needs no weights.

Every class has a semantic code ``c_k ~ N(0, I_D)``. The "text encoder" maps it to its
normalized text anchor ``t_k = c_k / |c_k|``. The "image encoder" sees the same code through a
modality gap shared by all classes, a linear distortion ``A = I + gap * G`` (G Gaussian / sqrt(D)),
plus a per-domain covariate shift ``s_d`` and noise:

    x = normalize(A c_k + s_d + noise * eps / sqrt(D) * |c_k|)

So zero-shot CLIP (argmax_k x . t_k) is right only as far as A is close to the identity, and a
head trained on a few labelled images can learn the correction; because A is shared, what it
learns on base classes transfers to new ones. Domain 0 is the source (s_0 = 0); domains 1..
add a shift ``shift * v_d`` (v_d random unit vectors) and more noise. Unknown classes have
codes with no text anchor (open-set OOD). Classes 0 .. ceil(C/2)-1 are base, the rest new.
"""
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass
class FeatureWorld:
    text: torch.Tensor           # [C, D] normalized text anchors of the known classes
    codes: torch.Tensor          # [C, D] their semantic codes
    unknown_codes: torch.Tensor  # [U, D] codes of classes with no text (open-set)
    gap: torch.Tensor            # [D, D] modality-gap distortion A
    shifts: torch.Tensor         # [num_domains, D] covariate shift per domain (row 0 = 0)
    noise: list                  # per-domain noise scale
    seed: int

    @property
    def num_classes(self) -> int:
        return self.text.shape[0]

    @property
    def num_base(self) -> int:
        return math.ceil(self.num_classes / 2)

    @property
    def classnames(self) -> list:
        return [f"class {k:03d}" for k in range(self.num_classes)]

    def images(self, labels: torch.Tensor, domain: int = 0, unknown: bool = False,
               seed: int = 0) -> torch.Tensor:
        """Normalized image features [len(labels), D] of these classes in this domain."""
        g = torch.Generator().manual_seed(hash((self.seed, domain, unknown, seed)) % 2**31)
        codes = (self.unknown_codes if unknown else self.codes)[labels]
        noise = self.noise[domain] * torch.randn(codes.shape, generator=g) / codes.shape[1] ** 0.5
        x = codes @ self.gap.T + self.shifts[domain] * codes.norm(dim=1, keepdim=True) \
            + noise * codes.norm(dim=1, keepdim=True)
        return F.normalize(x, dim=1)

    def sample(self, per_class: int, classes=None, domain: int = 0, unknown: bool = False,
               seed: int = 0):
        """(features, labels): ``per_class`` images of each class in ``classes`` (default all)."""
        pool = self.unknown_codes.shape[0] if unknown else self.num_classes
        classes = torch.arange(pool) if classes is None else torch.as_tensor(classes)
        labels = classes.repeat_interleave(per_class)
        return self.images(labels, domain, unknown, seed), labels


def make_feature_world(num_classes: int = 40, num_unknown: int = 20, dim: int = 128,
                       rank: int = 16, gap: float = 2.0, shift: float = 1.0, noise: float = 1.5,
                       num_domains: int = 3, seed: int = 0) -> FeatureWorld:
    """Build the world (see the module docstring for what each knob means).

    Codes live near a shared direction plus a ``rank``-dimensional class subspace, so classes
    are as crowded as CLIP's (cosine similarities between class anchors around 0.5).
    """
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, generator=g)
    basis = torch.linalg.qr(torch.randn(dim, rank, generator=g))[0] * (dim / rank) ** 0.5

    def draw(n):
        return common + torch.randn(n, rank, generator=g) @ basis.T

    codes, unknown = draw(num_classes), draw(num_unknown)
    distortion = torch.eye(dim) + gap * torch.randn(dim, dim, generator=g) / dim ** 0.5
    shifts = torch.zeros(num_domains, dim)
    if num_domains > 1:
        shifts[1:] = shift * F.normalize(torch.randn(num_domains - 1, dim, generator=g), dim=1)
    noise_levels = [noise] + [noise * 1.25] * (num_domains - 1)
    return FeatureWorld(F.normalize(codes, dim=1), codes, unknown, distortion, shifts,
                        noise_levels, seed)


class WorldTextModel(nn.Module):
    """The world's text encoder with a learnable, class-shared correction: the stand-in for a
    prompt learner. ``forward()`` returns ``normalize(c_k + c_k R^T)`` for every known class;
    R starts at zero, so the untrained model gives the zero-shot text anchors exactly.
    """

    def __init__(self, world: FeatureWorld):
        super().__init__()
        self.register_buffer("codes", world.codes.clone())
        self.residual = nn.Parameter(torch.zeros(world.codes.shape[1], world.codes.shape[1]))

    def forward(self):
        return F.normalize(self.codes + self.codes @ self.residual.t(), dim=1)
