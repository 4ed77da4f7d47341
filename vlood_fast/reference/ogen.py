"""Literal plain-autograd versions of OGEN's selection, synthesis and class statistics.

Ground truth for the tests (run in fp64) and the baseline of the benchmarks (run in the input
dtype). They materialize what OGEN's code materializes: the full U x C similarity matrix, a
top-k over it, the gathered [U, k, D] keys/values, then the generator module's own forward.

Tie rule (shared by every implementation): bank entries are ranked by similarity, highest
first; equal similarities rank the lower bank index first. ``torch.topk`` leaves ties
unspecified, so ``topk_lowest_index`` resolves them explicitly.
"""
import torch


def rank_candidates(values: torch.Tensor, indices: torch.Tensor, k: int):
    """Per row, the k best (value, index) pairs by (value desc, index asc); indices unique per row."""
    order = indices.argsort(dim=1)
    values, indices = values.gather(1, order), indices.gather(1, order)
    order = values.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, order), indices.gather(1, order)


def topk_lowest_index(similarity: torch.Tensor, k: int):
    """``similarity.topk(k, dim=1)`` with ties broken towards the lower column index.

    topk(k + 1) tells whether a row's k-th and (k+1)-th values tie (only then is the top-k set
    ambiguous); those rows are re-ranked with a stable sort, every row is then ordered by
    (value desc, index asc).
    """
    width = similarity.shape[1]
    if width <= k:
        idx = torch.arange(width, device=similarity.device).expand_as(similarity)
        return rank_candidates(similarity, idx, k)
    values, indices = similarity.topk(k + 1, dim=1)
    ambiguous = values[:, k - 1] == values[:, k]
    values, indices = values[:, :k], indices[:, :k]
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero().squeeze(1)
        ranked = similarity[rows].sort(dim=1, descending=True, stable=True)
        values = values.index_copy(0, rows, ranked.values[:, :k])
        indices = indices.index_copy(0, rows, ranked.indices[:, :k])
    return rank_candidates(values, indices, k)


def select_neighbours(queries, bank_keys, k, exclude=None):
    """Indices [U, k] of the k bank rows most similar (dot product) to each query."""
    with torch.no_grad():
        similarity = queries @ bank_keys.t()
        if exclude is not None:
            similarity[torch.arange(similarity.shape[0], device=similarity.device), exclude] = float("-inf")
        return topk_lowest_index(similarity, k)[1]


def synthesize(generator, queries, bank_keys, bank_values, k=3, exclude=None):
    """(features [U, D], indices [U, k]): explicit similarity, top-k, gather, module forward."""
    with torch.no_grad():  # the selection is discrete: no gradient through it
        similarity = queries @ bank_keys.t()  # the U x C matrix, alive through the forward as in OGEN's code
        if exclude is not None:
            similarity[torch.arange(similarity.shape[0], device=similarity.device), exclude] = float("-inf")
        indices = topk_lowest_index(similarity, k)[1]
    features = generator(queries[:, None, :], bank_keys[indices], bank_values[indices])
    return features[:, 0, :], indices


def class_statistics(features, labels, num_classes, correction=1):
    """(mean [C, D], std [C, D], count [C]) by looping over classes; std 0 where count <= correction."""
    D = features.shape[1]
    mean = features.new_zeros(num_classes, D)
    std = features.new_zeros(num_classes, D)
    count = torch.zeros(num_classes, dtype=features.dtype, device=features.device)
    for c in range(num_classes):
        rows = features[labels == c]
        count[c] = rows.shape[0]
        if rows.shape[0] > 0:
            mean[c] = rows.mean(0)
        if rows.shape[0] > correction:
            std[c] = rows.std(0, correction=correction)
    return mean, std, count


def class_neighbours(class_means, k=3):
    """OGEN's table: top-k of mu mu^T with the diagonal set to -inf (self excluded)."""
    similarity = class_means @ class_means.t()
    similarity.fill_diagonal_(float("-inf"))
    return topk_lowest_index(similarity, k)[1]
