"""OGEN (Zang et al., ICLR 2024): class-conditional feature generator, class statistics, loss.

- ``OgenGenerator``: ``Gen(q, K, V) = normalize(FFN(q) + MHA(q, K, V))``; parameter names match
  ``nn.MultiheadAttention`` (``attn.*``) and ``ffn = Sequential(Linear, ReLU, Linear)``.
  ``synthesize`` runs it on the top-k neighbours of each query in a bank without a U x C matrix.
- ``ClassStatistics``: streaming per-class mean/std of frozen image features, and the
  neighbour table ``N(c) = top-3 of mu mu^T`` with self excluded (``class_neighbours``).
- ``OgenLoss``: forward/reverse/new-class synthesis, ``L_gen`` and the weighted cross-entropy
  terms, the generator-only warm-up and the ``joint`` option (DESIGN.md section 4), plus an
  optional distillation term from a ``LocalMeanTeacher`` (``vlood_fast.teacher``).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _validation as V
from .ops.similarity_lse import clip_cross_entropy
from .ops.synthesis import synthesize as _synthesize
from .ops.synthesis import topk_neighbours
from .teacher import distillation_loss


class OgenGenerator(nn.Module):
    """OGEN's feature generator: ``normalize(FFN(q) + MHA(q, K, V))`` over the last dim.

    Args:
        dim: feature dim D (divisible by ``num_heads``); num_heads: attention heads;
        dropout: attention-weight dropout (train mode only).
    Shapes: ``forward(query [N, Lq, D], keys [N, Lk, D], values [N, Lk, D]) -> [N, Lq, D]``,
    any float dtype matching the parameters. Parameters: ``attn.in_proj_weight [3D, D]``,
    ``attn.in_proj_bias``, ``attn.out_proj.{weight,bias}``, ``ffn.0.*``, ``ffn.2.*``.

    Example::

        gen = OgenGenerator(512)
        x = gen(text[:, None], nbr_text, nbr_images)         # [N, 1, 512], unit norm
        feats, nbrs = gen.synthesize(new_text, base_text, class_means, k=3)
    """

    def __init__(self, dim: int = 512, num_heads: int = 4, dropout: float = 0.1):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"num_heads must be a positive int dividing dim={dim}, got {num_heads!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        self.dim, self.num_heads = dim, num_heads
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=float(dropout), batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, query, keys, values):
        for name, t in (("query", query), ("keys", keys), ("values", values)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3 or t.shape[-1] != self.dim:
                dims = "[N, Lq, D]" if name == "query" else "[N, Lk, D]"
                raise ValueError(f"{name} must have shape {dims} with D={self.dim}, got {tuple(t.shape)}")
        if keys.shape != values.shape or keys.shape[0] != query.shape[0]:
            raise ValueError(f"keys and values must both be [N, Lk, D] with N={query.shape[0]}, "
                             f"got {tuple(keys.shape)} and {tuple(values.shape)}")
        attended, _ = self.attn(query, keys, values, need_weights=False)
        return F.normalize(self.ffn(query) + attended, dim=-1)

    def synthesize(self, queries, bank_keys, bank_values, k=3, exclude=None, *, backend=None):
        """Batched synthesis: see ``vlood_fast.ops.synthesis.synthesize``.

        ``queries [U, D]``, ``bank_keys/bank_values [C, D]`` -> ``(features [U, D], indices [U, k])``:
        per query the k bank rows with the highest ``q . b`` (ties: lower index first; optionally
        not ``exclude[u]``), then this generator on them. Never builds the U x C matrix.

        Example::

            feats, nbrs = gen.synthesize(base_text, base_text, class_means, k=3,
                                         exclude=torch.arange(len(base_text)))
        """
        return _synthesize(self, queries, bank_keys, bank_values, k, exclude, backend=backend)

    @staticmethod
    def convert_reference_state_dict(state_dict, prefix: str = "prompt_learner."):
        """Map OGEN's released checkpoint names (``multihead_attn.*``, ``ffn.layers.{0,1}.*``) to ours.

        Example::

            sd = torch.load("prompt_learner/model.pth.tar")["state_dict"]
            gen.load_state_dict(OgenGenerator.convert_reference_state_dict(sd, prefix=""))
        """
        out = {}
        for name, value in state_dict.items():
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if rest.startswith("multihead_attn."):
                out["attn." + rest[len("multihead_attn."):]] = value
            elif rest.startswith("ffn.layers.0."):
                out["ffn.0." + rest[len("ffn.layers.0."):]] = value
            elif rest.startswith("ffn.layers.1."):
                out["ffn.2." + rest[len("ffn.layers.1."):]] = value
        return out


def class_neighbours(class_means, k: int = 3, *, backend=None):
    """OGEN's neighbour table ``N(c) = top-k_{c' != c} mu_c . mu_c'`` (ties: lower index first).

    Args: class_means ``[C, D]`` float (C > k). Returns: int64 ``[C, k]``, most similar first.

    Example::

        stats = ClassStatistics(1000, 512); stats.update(feats, labels)
        nbrs = class_neighbours(stats.mean)     # [1000, 3]
    """
    V.check_matrix("class_means", class_means, "[C, D]")
    C = class_means.shape[0]
    exclude = torch.arange(C, device=class_means.device)
    return topk_neighbours(class_means, class_means, k, exclude, backend=backend)


class ClassStatistics(nn.Module):
    """Streaming per-class mean and std of features: one pass over any number of batches.

    Chan et al.'s parallel update merges each batch's per-class (count, mean, M2) into fp64
    running buffers, so the result equals a two-pass computation up to rounding. ``std`` uses
    ``correction`` (1 = unbiased, like ``torch.std``) and is 0 where count <= correction.

    Args: num_classes C, dim D, correction. Buffers (state_dict): ``count [C]``,
    ``running_mean [C, D]``, ``running_m2 [C, D]`` (float64).

    Example::

        stats = ClassStatistics(num_classes=100, dim=512)
        for feats, labels in loader: stats.update(feats, labels)
        mu, sigma, nbrs = stats.mean, stats.std, stats.neighbours(3)
    """

    def __init__(self, num_classes: int, dim: int, correction: int = 1):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.num_classes, self.dim, self.correction = num_classes, dim, int(correction)
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("running_mean", torch.zeros(num_classes, dim, dtype=torch.float64))
        self.register_buffer("running_m2", torch.zeros(num_classes, dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, features, labels):
        """Merge one batch: features ``[B, D]`` float, labels integer ``[B]`` in ``[0, C)``."""
        V.check_matrix("features", features, f"[B, {self.dim}]")
        if features.shape[1] != self.dim:
            raise ValueError(f"features must have shape [B, {self.dim}], got {tuple(features.shape)}")
        if features.device != self.count.device:
            raise ValueError(f"features are on {features.device} but the statistics on {self.count.device}")
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor of shape [{features.shape[0]}]")
        if labels.shape != (features.shape[0],):
            raise ValueError(f"labels must have shape [{features.shape[0]}], got {tuple(labels.shape)}")
        labels = labels.to(features.device).long()
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got values in [{lo}, {hi}]")
        x = features.to(torch.float64)
        n_b = torch.bincount(labels, minlength=self.num_classes).to(torch.float64)
        mean_b = torch.zeros_like(self.running_mean).index_add_(0, labels, x) / n_b.clamp_min(1)[:, None]
        m2_b = torch.zeros_like(self.running_m2).index_add_(0, labels, (x - mean_b[labels]).square_())
        total = self.count + n_b
        delta = mean_b - self.running_mean
        share = (n_b / total.clamp_min(1))[:, None]
        self.running_mean += delta * share
        self.running_m2 += m2_b + delta.square() * (self.count[:, None] * share)
        self.count.copy_(total)
        return self

    @property
    def mean(self) -> torch.Tensor:
        """Per-class mean ``[C, D]`` (float32)."""
        return self.running_mean.float()

    @property
    def std(self) -> torch.Tensor:
        """Per-class std ``[C, D]`` (float32), 0 where count <= correction."""
        dof = (self.count - self.correction)[:, None]
        var = torch.where(dof > 0, self.running_m2 / dof.clamp_min(1), torch.zeros_like(self.running_m2))
        return var.clamp_min_(0).sqrt_().float()

    def neighbours(self, k: int = 3, *, backend=None) -> torch.Tensor:
        """``class_neighbours(self.mean, k)``: int64 ``[C, k]``."""
        return class_neighbours(self.mean, k, backend=backend)


class OgenLoss(nn.Module):
    """OGEN's training objective (DESIGN.md section 4), with the generator as a submodule.

    Per batch (x_b, y_b), base text W [K, D], new-class text W_new [Kn, D], noise eps ~ U[0,1)^D:
    ``xhat_y = Gen(w_y, W[N(y)], mu + eps sigma)``, ``xhat_k = Gen(w_k, w_y, x_b)`` (k in N(y)),
    ``xhat_n = Gen(w_n, w_y, x_b)`` (n: the 3 new classes nearest w_y);
    ``L_gen = D mse(xhat_y, x) + D mse(xhat_k, mu_k + eps sigma_k)``; while ``progress < warmup``
    the total is L_gen alone, then
    ``L_gen + .25 CE(xhat_y; W, y) + .25/3 CE(xhat_k; W, k) + .5/3 CE(xhat_n; W_new, n) + .25 CE(x; W, y)``.
    ``joint=True`` scores xhat_n against ``[W; W_new]``. With teacher text features given (after
    warm-up), ``+ distill_weight * (KD on real logits + KD on xhat_n logits)``.
    Queries/keys taken from W are detached (as in OGEN's code); W_new queries are not.

    Args:
        generator: ``OgenGenerator``; class_mean, class_std: ``[K, D]`` statistics;
        neighbours: int ``[K, num_neighbours]`` (default ``class_neighbours(class_mean)``);
        logit_scale s; warmup (fraction of training); joint; num_neighbours (3);
        distill_weight, distill_temperature.
    Returns from ``forward``: ``(total, components)``, components a dict of named scalar tensors.

    Example::

        crit = OgenLoss(gen, stats.mean, stats.std)
        loss, parts = crit(x, y, text, new_text, progress=epoch / epochs)
        loss.backward()
    """

    def __init__(self, generator, class_mean, class_std, neighbours=None, logit_scale=100.0,
                 warmup=0.2, joint=False, num_neighbours=3, distill_weight=1.0,
                 distill_temperature=2.0):
        super().__init__()
        if not isinstance(generator, OgenGenerator):
            raise TypeError(f"generator must be an OgenGenerator, got {type(generator).__name__}")
        V.check_matrix("class_mean", class_mean, "[K, D]")
        V.check_matrix("class_std", class_std, "[K, D]")
        if class_std.shape != class_mean.shape or class_mean.shape[1] != generator.dim:
            raise ValueError(f"class_mean and class_std must both be [K, {generator.dim}], got "
                             f"{tuple(class_mean.shape)} and {tuple(class_std.shape)}")
        self.generator = generator
        self.logit_scale = V.check_positive("logit_scale", logit_scale)
        self.distill_temperature = V.check_positive("distill_temperature", distill_temperature)
        if not 0.0 <= float(warmup) <= 1.0:
            raise ValueError(f"warmup must lie in [0, 1], got {warmup!r}")
        self.warmup, self.joint = float(warmup), bool(joint)
        self.num_neighbours, self.distill_weight = int(num_neighbours), float(distill_weight)
        if neighbours is None:
            neighbours = class_neighbours(class_mean.detach(), self.num_neighbours)
        if neighbours.shape != (class_mean.shape[0], self.num_neighbours) or neighbours.dtype.is_floating_point:
            raise ValueError(f"neighbours must be an integer tensor [K, {self.num_neighbours}], "
                             f"got {neighbours.dtype} {tuple(neighbours.shape)}")
        self.register_buffer("class_mean", class_mean.detach().clone())
        self.register_buffer("class_std", class_std.detach().clone())
        self.register_buffer("neighbours", neighbours.detach().long().clone())

    def forward(self, image_features, labels, text_features, new_text_features, progress=1.0,
                noise=None, teacher_text_features=None, teacher_new_text_features=None):
        """``image_features [B, D]``, labels ``[B]`` in ``[0, K)``, ``text_features [K, D]``,
        ``new_text_features [Kn, D]`` (Kn >= num_neighbours), progress = fraction of training
        done, noise ``[D]`` in [0, 1) (default fresh ``torch.rand``), teacher text optional."""
        x, W, Wn = image_features, text_features, new_text_features
        V.check_matrix("image_features", x, "[B, D]")
        V.check_matrix("text_features", W, "[K, D]")
        V.check_matrix("new_text_features", Wn, "[Kn, D]")
        V.check_same_dim("image_features", x, "text_features", W)
        V.check_same_dim("image_features", x, "new_text_features", Wn)
        V.check_compatible(image_features=x, text_features=W, new_text_features=Wn)
        K, D = self.class_mean.shape
        if W.shape != (K, D):
            raise ValueError(f"text_features must have shape [{K}, {D}] (one row per base class), "
                             f"got {tuple(W.shape)}")
        if Wn.shape[0] < self.num_neighbours:
            raise ValueError(f"new_text_features needs at least {self.num_neighbours} rows, got {Wn.shape[0]}")
        y = V.check_labels(labels, x.shape[0], K, x.device)
        if noise is None:
            noise = torch.rand(D, device=x.device, dtype=self.class_mean.dtype)
        elif not isinstance(noise, torch.Tensor) or noise.shape != (D,):
            raise ValueError(f"noise must be a tensor of shape [{D}]")
        gen, s, k = self.generator, self.logit_scale, self.num_neighbours
        nbr = self.neighbours[y]                                          # [B, k]
        virtual = (self.class_mean + noise * self.class_std).to(x.dtype)  # mu + eps sigma, [K, D]
        w_y = W[y].detach()
        # forward synthesis: an image feature for class y from its neighbours' statistics
        x_y = gen(w_y[:, None], W[nbr].detach(), virtual[nbr])[:, 0]
        # reverse synthesis: the neighbours' features from this image
        x_k = gen(W[nbr].detach(), w_y[:, None], x[:, None]).reshape(-1, D)
        parts = {"gen_forward": D * F.mse_loss(x_y, x), "gen_reverse": D * F.mse_loss(x_k, virtual[nbr].reshape(-1, D))}
        total = parts["gen_forward"] + parts["gen_reverse"]
        if float(progress) < self.warmup:
            parts["total"] = total
            return total, parts
        # new-class synthesis: the k new classes nearest w_y, from this image
        new = topk_neighbours(w_y, Wn.detach(), k)                        # [B, k]
        x_n = gen(Wn[new], w_y[:, None], x[:, None]).reshape(-1, D)
        new_labels = new.reshape(-1)
        new_text = Wn
        if self.joint:
            new_text, new_labels = torch.cat([W, Wn]), new_labels + K
        parts["ce_forward"] = clip_cross_entropy(x_y, W, y, s)
        parts["ce_reverse"] = clip_cross_entropy(x_k, W, nbr.reshape(-1), s)
        parts["ce_new"] = clip_cross_entropy(x_n, new_text, new_labels, s)
        parts["ce_real"] = clip_cross_entropy(x, W, y, s)
        total = (total + 0.25 * parts["ce_forward"] + (0.25 / k) * parts["ce_reverse"]
                 + (0.5 / k) * parts["ce_new"] + 0.25 * parts["ce_real"])
        if teacher_text_features is not None:
            Wt = teacher_text_features.detach()
            Wnt = teacher_new_text_features.detach() if teacher_new_text_features is not None else Wn.detach()
            teacher_new = torch.cat([Wt, Wnt]) if self.joint else Wnt
            T = self.distill_temperature
            parts["distill"] = (distillation_loss(s * x @ W.t(), s * x @ Wt.t(), T)
                                + distillation_loss(s * x_n @ new_text.t(), s * x_n.detach() @ teacher_new.t(), T))
            total = total + self.distill_weight * parts["distill"]
        parts["total"] = total
        return total, parts
