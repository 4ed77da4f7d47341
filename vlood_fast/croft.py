"""CRoFT (Zhu et al., ICML 2024): residual adapters, the WCCF shift generator and the objective.

DESIGN.md section 3, with frozen normalized image features F [B, D], text features Gmat [K, D]:

- ``CroftAdapter``: ``A_i(x) = normalize(r x W_i^T + (1-r) x)``, ``A_t(g)`` likewise with r_t;
  W_i, W_t identity-initialized, so the untrained adapter is zero-shot CLIP.
- ``ShiftGenerator`` (WCCF): ``C = normalize(U M^T + U)``, M identity-initialized.
- ``CroftLoss``:
  generator step (updates M only): ``CE(s C V^T, y) + lambda1 align(C, U)``;
  main step: ``CE(s U V^T, y) + CE(s A_i(C) V^T, y) - lambda1 align(C, F) + lambda2 R([F; C])``
  with ``align(X, Y) = mean_ab [y_a = y_b] x_a . y_b`` and R the EDR penalty
  (``vlood_fast.edr_penalty``) at the adapter's weights.
- ``croft_ood_score``: ``S(x) = logsumexp_k(s A_i(x) . A_t(g_k))``, higher = in-distribution.

Deviations from the paper's code (kept on purpose, see the README): the penalty is taken at W
(the code adds 1e-4 to every weight first); the adapter map inside the penalty is the one of
the forward (the code applies the weight untransposed in one place and transposed in the
other); the generator step updates only the generator.
"""
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _validation as V
from .dispatch import resolve_backend
from .ops.edr import PRESETS, adapter_map, croft_terms, edr_penalty
from .ops.similarity_lse import clip_cross_entropy, similarity_logsumexp

__all__ = ["CroftAdapter", "CroftAdapted", "ShiftGenerator", "CroftLoss", "croft_ood_score",
           "label_alignment"]


def _positive_dim(dim):
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    return dim


def _ratio(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


class CroftAdapter(nn.Module):
    """Residual linear adapters on frozen CLIP features (identity-initialized).

    ``image(x) = normalize(r x W_i^T + (1-r) x)``, ``text(g) = normalize(r_t g W_t^T + (1-r_t) g)``.

    Args: dim D; ratio r (image side, default 0.2); ratio_text r_t (default 0.5).
    Shapes: ``image([B, D]) -> [B, D]``, ``text([K, D]) -> [K, D]``, unit-norm rows.
    Parameters: ``image_weight [D, D]``, ``text_weight [D, D]`` (``x @ W.T`` convention).

    Example::

        adapter = CroftAdapter(512)
        logits = 100 * adapter.image(img) @ adapter.text(txt).T
    """

    def __init__(self, dim: int, ratio: float = 0.2, ratio_text: float = 0.5):
        super().__init__()
        dim = _positive_dim(dim)
        self.ratio, self.ratio_text = _ratio("ratio", ratio), _ratio("ratio_text", ratio_text)
        self.image_weight = nn.Parameter(torch.eye(dim))
        self.text_weight = nn.Parameter(torch.eye(dim))

    @property
    def dim(self) -> int:
        return self.image_weight.shape[0]

    def _adapt(self, x, weight, ratio, name):
        V.check_matrix(name, x, f"[N, {self.dim}]")
        if x.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape [N, {self.dim}], got {tuple(x.shape)}")
        return F.normalize(adapter_map(x, weight, ratio), dim=1)

    def image(self, x):
        """Adapted, normalized image features ``[B, D]``."""
        return self._adapt(x, self.image_weight, self.ratio, "image features")

    def text(self, g):
        """Adapted, normalized text features ``[K, D]``."""
        return self._adapt(g, self.text_weight, self.ratio_text, "text features")

    def forward(self, image_features, text_features):
        return self.image(image_features), self.text(text_features)


class ShiftGenerator(nn.Module):
    """WCCF: a learned worst-case covariate shift ``C = normalize(U M^T + U)`` (M = I at init).

    Shapes: ``[B, D] -> [B, D]`` unit-norm rows. Parameter: ``weight [D, D]``.

    Example::

        gen = ShiftGenerator(512)
        shifted = gen(adapter.image(img))
    """

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(_positive_dim(dim)))

    def forward(self, u):
        V.check_matrix("u", u, f"[B, {self.weight.shape[0]}]")
        if u.shape[1] != self.weight.shape[0]:
            raise ValueError(f"u must have shape [B, {self.weight.shape[0]}], got {tuple(u.shape)}")
        return F.normalize(torch.addmm(u, u, self.weight.to(u.dtype).t()), dim=1)


def label_alignment(x, y, labels):
    """``align(X, Y) = mean over all B^2 pairs of [y_a = y_b] * (x_a . y_b)``, as
    ``<X, mask Y> / B^2`` (one B x B x D product, no B x B similarity matrix)."""
    B = x.shape[0]
    mask = (labels[:, None] == labels[None, :]).to(y.dtype)
    return torch.vdot(torch.mm(mask, y).view(-1), x.reshape(-1)) / (B * B)


class CroftAdapted(NamedTuple):
    """Adapted rows of one batch: ``a = r F W_i^T + (1-r) F``, ``u = normalize(a)``,
    ``e = r_t G W_t^T + (1-r_t) G``, ``v = normalize(e)`` (with autograd graphs to the adapter)."""
    a: torch.Tensor
    u: torch.Tensor
    e: torch.Tensor
    v: torch.Tensor


class CroftLoss(nn.Module):
    """The CRoFT objective: a generator-step loss and a main-step loss (DESIGN.md section 3).

    Args:
        adapter: ``CroftAdapter``; generator: ``ShiftGenerator`` or None (WCCF off).
        preset: ``"setup1"`` (ImageNet protocol: EDR potential "sum", penalty "mean") or
            ``"setup2"`` (PACS/VLCS: "mean", "sum").
        lambda1: alignment weight (default 1); lambda2: EDR weight (default 5);
        logit_scale s (100); temperature T of the EDR potential (1).
    ``main(features, labels, text)`` and ``generator_step(features, labels, text)`` take the frozen
    normalized image features ``[B, D]``, integer labels ``[B]`` and frozen normalized text
    features ``[K, D]``; each returns ``(total, parts)`` with named scalar components
    (``ce``, ``shift_ce``, ``align``, ``edr``; the generator step: ``shift_ce``, ``align``).
    ``step(...)`` runs a whole training step (generator step(s), then the main step) sharing
    the adapted rows between them (``adapt``, ``adapted=``).

    Example::

        adapter, gen = CroftAdapter(512), ShiftGenerator(512)
        crit = CroftLoss(adapter, gen, preset="setup1")
        g_loss, _ = crit.generator_step(feats, y, text); g_loss.backward(); gen_opt.step()
        loss, parts = crit.main(feats, y, text); loss.backward(); adapter_opt.step()
        # or, sharing the adapted rows: crit.step(feats, y, text, adapter_opt, gen_opt)
    """

    def __init__(self, adapter: CroftAdapter, generator: ShiftGenerator | None = None,
                 preset: str = "setup1", lambda1: float = 1.0, lambda2: float = 5.0,
                 logit_scale: float = 100.0, temperature: float = 1.0):
        super().__init__()
        if not isinstance(adapter, CroftAdapter):
            raise TypeError(f"adapter must be a CroftAdapter, got {type(adapter).__name__}")
        if generator is not None and not isinstance(generator, ShiftGenerator):
            raise TypeError(f"generator must be a ShiftGenerator or None, got {type(generator).__name__}")
        V.check_choice("preset", preset, tuple(PRESETS))
        self.adapter, self.generator, self.preset = adapter, generator, preset
        self.lambda1, self.lambda2 = float(lambda1), float(lambda2)
        self.logit_scale = V.check_positive("logit_scale", logit_scale)
        self.temperature = V.check_positive("temperature", temperature)

    def _check_features(self, features, text):
        V.check_matrix("features", features, "[B, D]")
        V.check_matrix("text", text, "[K, D]")
        V.check_same_dim("features", features, "text", text)
        V.check_compatible(features=features, text=text)
        if features.shape[1] != self.adapter.dim:
            raise ValueError(f"features must have shape [B, {self.adapter.dim}] (the adapter's dim), "
                             f"got {tuple(features.shape)}")

    def _check(self, features, labels, text):
        self._check_features(features, text)
        return V.check_labels(labels, features.shape[0], text.shape[0], features.device)

    def adapt(self, features, text):
        """``CroftAdapted(a, u, e, v)`` for one batch, with graphs to the adapter weights.

        Pass it as ``adapted=`` to ``generator_step`` and ``main`` of the same step (the adapter
        does not move in between): the text side, a [K, D] x [D, D] product, is then computed
        once per step instead of twice (``step`` does this)."""
        self._check_features(features, text)
        ad = self.adapter
        a = adapter_map(features, ad.image_weight, ad.ratio)
        e = adapter_map(text, ad.text_weight, ad.ratio_text)
        return CroftAdapted(a, F.normalize(a, dim=1), e, F.normalize(e, dim=1))

    def generator_step(self, features, labels, text, adapted=None):
        """WCCF loss for the generator: ``CE(s C V^T, y) + lambda1 align(C, U)`` (adapter frozen)."""
        if self.generator is None:
            raise RuntimeError("generator_step needs a ShiftGenerator (WCCF is off)")
        y = self._check(features, labels, text)
        if adapted is None:
            with torch.no_grad():
                u, v = self.adapter.image(features), self.adapter.text(text)
        else:
            u, v = adapted.u.detach(), adapted.v.detach()
        c = self.generator(u)
        parts = {"shift_ce": clip_cross_entropy(c, v, y, self.logit_scale),
                 "align": label_alignment(c, u, y)}
        total = parts["shift_ce"] + self.lambda1 * parts["align"]
        return total, dict(parts, total=total)

    def main(self, features, labels, text, adapted=None):
        """Adapter loss: ``CE(s U V^T) [+ CE(s A_i(C) V^T) - lambda1 align(C, F)] + lambda2 R``.

        Differentiates w.r.t. the adapter only (the generator's M is held fixed here). The
        cross-entropies and the penalty share the adapted rows and, on the torch path, every
        N x K product (``ops.edr.croft_terms``): one [K, D] x [D, D] product and one W_t
        gradient GEMM serve all three terms."""
        y = self._check(features, labels, text)
        st = adapted if adapted is not None else self.adapt(features, text)
        ad, B = self.adapter, features.shape[0]
        if self.generator is not None:
            u = st.u
            c = F.normalize(torch.addmm(u, u, self.generator.weight.detach().to(u.dtype).t()), dim=1)
            a_c = adapter_map(c, ad.image_weight, ad.ratio)
            a, z, yy = torch.cat([st.a, a_c]), torch.cat([features, c]), torch.cat([y, y])
        else:
            a, z, yy = st.a, features, y
        kw = dict(ratio=ad.ratio, ratio_text=ad.ratio_text, temperature=self.temperature,
                  **PRESETS[self.preset])
        which = resolve_backend(features.device, features.dtype)
        if which == "reference" or torch.compiler.is_compiling():
            # the literal composition (the reference), or opaque custom ops for torch.compile
            ce = clip_cross_entropy(F.normalize(a, dim=1), st.v, yy, self.logit_scale,
                                    reduction="none", backend=which)
            edr = edr_penalty(z, text, ad.image_weight.to(z.dtype), ad.text_weight.to(z.dtype), **kw,
                              backend=which)
        else:
            ce, edr = croft_terms(a, st.e, z, text, yy, self.logit_scale, **kw, backend=which)
        parts = {"ce": ce[:B].mean()}
        if self.generator is not None:
            parts["shift_ce"] = ce[B:].mean()
            parts["align"] = label_alignment(c, features, y)
        parts["edr"] = edr
        total = parts["ce"] + self.lambda2 * parts["edr"]
        if self.generator is not None:
            total = total + parts["shift_ce"] - self.lambda1 * parts["align"]
        return total, dict(parts, total=total)

    def step(self, features, labels, text, optimizer, generator_optimizer=None, gen_steps=1):
        """One CRoFT training step: ``gen_steps`` generator steps, then the main step; each is
        forward + backward + ``optimizer.step()``. The adapted rows are computed once and
        shared. Returns the named components (detached) of the last generator and main losses.

        Example::

            opt = torch.optim.SGD(adapter.parameters(), lr=0.002, weight_decay=0.1)
            gen_opt = torch.optim.SGD(generator.parameters(), lr=0.002, weight_decay=0.1)
            logs = criterion.step(feats, labels, text, opt, gen_opt)
        """
        self._check(features, labels, text)
        st = self.adapt(features, text)
        logs = {}
        if self.generator is not None and gen_steps > 0:
            if generator_optimizer is None:
                raise ValueError("generator_optimizer is required when the generator (WCCF) is on")
            for _ in range(gen_steps):
                g_loss, g_parts = self.generator_step(features, labels, text, adapted=st)
                generator_optimizer.zero_grad(set_to_none=True)
                g_loss.backward()
                generator_optimizer.step()
            logs.update({f"gen_{k}": v.detach() for k, v in g_parts.items()})
        loss, parts = self.main(features, labels, text, adapted=st)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        logs.update({k: v.detach() for k, v in parts.items()})
        return logs

    def forward(self, features, labels, text):
        return self.main(features, labels, text)


def croft_ood_score(adapter: CroftAdapter, image_features, text_features, logit_scale=100.0):
    """CRoFT's OOD score ``S(x) = logsumexp_k(s A_i(x) . A_t(g_k))`` ``[B]``, higher = ID.

    Example::

        s_id = croft_ood_score(adapter, feats_id, text); s_ood = croft_ood_score(adapter, feats_ood, text)
        vlood_fast.ood_metrics(s_id, s_ood)
    """
    return similarity_logsumexp(adapter.image(image_features), adapter.text(text_features),
                                V.check_positive("logit_scale", logit_scale))
