"""The EDR penalty (CRoFT) the way the paper's code computes it: a literal double backward.

``G = d Phi / d delta`` with one D x D perturbation delta added to BOTH adapter weights, taken
with ``autograd.grad(create_graph=True)``; the penalty ``c_R ||G||^2`` is then differentiated
again by autograd. Ground truth for the tests (in fp64) and baseline for the benchmarks.
"""
import torch
import torch.nn.functional as F


def edr_penalty(z, text_features, image_weight, text_weight, ratio=0.2, ratio_text=0.5,
                temperature=1.0, potential="sum", penalty="mean"):
    N, D = z.shape
    K = text_features.shape[0]
    delta = torch.zeros(D, D, dtype=z.dtype, device=z.device, requires_grad=True)
    a = ratio * z @ (image_weight + delta).t() + (1 - ratio) * z
    e = ratio_text * text_features @ (text_weight + delta).t() + (1 - ratio_text) * text_features
    u, v = F.normalize(a, dim=1), F.normalize(e, dim=1)
    phi = torch.exp(u @ v.t() / temperature).sum()
    if potential == "mean":
        phi = phi / (N * K)
    (G,) = torch.autograd.grad(phi, delta, create_graph=True)
    R = (G ** 2).sum()
    return R / D ** 2 if penalty == "mean" else R
