"""The built-in demo: energy-based OOD detection on a generated CLIP-like feature world.

The world: K class text anchors on the unit sphere; in-distribution image features are an
anchor plus Gaussian noise, renormalized; unknown-class images come from held-out anchors the
model has no text for. The energy score ``E = -T logsumexp(s x . t / T)`` should be lower for
in-distribution images. The demo computes it with every implementation, checks they agree,
and shows what the fused op saves for backward.
"""
import time

import torch
import torch.nn.functional as F

from . import clip_cross_entropy, energy_score
from .dispatch import resolve_backend
from .profiling import saved_tensor_bytes


def make_feature_world(num_classes=1000, num_unknown=250, per_class=4, dim=512, noise=6, seed=0):
    """Normalized text anchors [K, D], ID images [K*per_class, D] + labels, OOD images."""
    g = torch.Generator().manual_seed(seed)
    anchors = F.normalize(torch.randn(num_classes + num_unknown, dim, generator=g), dim=1)
    text, unknown = anchors[:num_classes], anchors[num_classes:]

    def images(centres):
        rows = centres.repeat_interleave(per_class, 0)
        return F.normalize(rows + noise * torch.randn(rows.shape, generator=g) / dim ** 0.5, dim=1)

    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return text, images(text), labels, images(unknown)


def _auroc(id_scores, ood_scores):
    """P(score_id > score_ood) + 0.5 P(tie): higher score = in-distribution."""
    diff = id_scores[:, None] - ood_scores[None, :]
    return ((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean()).item()


def run_demo(seed: int = 0, print_fn=print) -> dict:
    text, id_images, labels, ood_images = make_feature_world(seed=seed)
    default = resolve_backend(text.device, text.dtype)
    print_fn(f"vlood_fast demo: {text.shape[0]} classes, {id_images.shape[0]} ID and "
             f"{ood_images.shape[0]} unknown-class images, D={text.shape[1]}; default backend: {default}")

    rows = {}
    for backend in ("reference", "torch"):
        start = time.perf_counter()
        e_id = energy_score(id_images, text, backend=backend)
        e_ood = energy_score(ood_images, text, backend=backend)
        x = id_images.clone().requires_grad_()
        saved = saved_tensor_bytes(lambda a, t: clip_cross_entropy(a, t, labels, backend=backend), x, text)
        loss = clip_cross_entropy(x, text, labels, backend=backend)
        loss.backward()
        rows[backend] = dict(auroc=_auroc(-e_id, -e_ood), loss=loss.item(), grad=x.grad,
                             energy=e_id, seconds=time.perf_counter() - start, saved=saved)

    ref, fast = rows["reference"], rows["torch"]
    agree = (fast["energy"] - ref["energy"]).abs().max().item()
    grad_agree = ((fast["grad"] - ref["grad"]).abs().max() / ref["grad"].abs().max()).item()
    print_fn(f"{'implementation':<16}{'OOD AUROC':>10}{'CE loss':>10}{'saved for bwd':>16}{'time':>9}")
    for name, row in rows.items():
        print_fn(f"{name:<16}{row['auroc']:>10.4f}{row['loss']:>10.4f}"
                 f"{row['saved'] / 1024:>13.1f} KB{row['seconds'] * 1e3:>7.1f}ms")
    print_fn(f"max |energy difference| torch vs reference: {agree:.2e}; "
             f"max relative gradient difference: {grad_agree:.2e}")
    if agree > 1e-3 or grad_agree > 1e-4:
        raise RuntimeError("the torch path disagrees with the reference: please report this")
    return rows
