"""Literal plain-autograd versions of the energy score and CLIP cross-entropy.

They materialize the B x K logits exactly as CLIP fine-tuning code does; ground truth for the
tests (run in fp64) and the baseline of the benchmarks (run in the input dtype).
"""
import torch
import torch.nn.functional as F


def clip_logits(image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: float) -> torch.Tensor:
    return logit_scale * image_features @ text_features.t()


def energy_score(image_features, text_features, logit_scale=100.0, temperature=1.0):
    logits = clip_logits(image_features, text_features, logit_scale)
    return -temperature * torch.logsumexp(logits / temperature, dim=1)


def clip_cross_entropy(image_features, text_features, labels, logit_scale=100.0, reduction="mean"):
    logits = clip_logits(image_features, text_features, logit_scale)
    return F.cross_entropy(logits, labels.long(), reduction=reduction)
