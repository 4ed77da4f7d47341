"""open_clip glue: models by name, class text features, image features, a CoOp prompt learner.

Needs ``open_clip_torch`` (``pip install vlood_fast[clip]``); imported only when this module is.
Every feature returned here is L2-normalized float32.

A tiny architecture, ``TINY_MODEL`` (``"vlood-tiny"``: 32 px images, 1-layer towers, D = 32),
is registered with open_clip on import for tests and demos without downloads.
"""
import contextlib
import copy
import difflib
import logging
import os

import open_clip
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .cache import looks_like_path, weights_fingerprint

TINY_MODEL = "vlood-tiny"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# a small but CLIP-shaped architecture for CPU benchmarks (random init: about 9M parameters)
SMALL_MODEL = "vlood-small"
SMALL_CONFIG = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 256, "patch_size": 8, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}
DEFAULT_TEMPLATE = "a photo of a {}."

__all__ = ["DEFAULT_TEMPLATE", "PromptLearner", "SMALL_CONFIG", "SMALL_MODEL", "TINY_CONFIG",
           "TINY_MODEL", "class_text_features",
           "create_model", "encode_images", "register_model_config"]


def register_model_config(name: str, config: dict) -> None:
    """Make an architecture config (open_clip's JSON schema, as a dict) available by ``name``.

    Example::

        register_model_config("my-vit", {"embed_dim": 64, "vision_cfg": {...}, "text_cfg": {...}})
    """
    if not all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError("config must hold 'embed_dim', 'vision_cfg' and 'text_cfg'")
    # open_clip reads architectures from this registry (add_model_config only takes JSON files);
    # its rescans rebuild the dict from the old one, so entries added here survive.
    open_clip.factory._MODEL_CONFIGS[name] = dict(config)


register_model_config(TINY_MODEL, TINY_CONFIG)
register_model_config(SMALL_MODEL, SMALL_CONFIG)


@contextlib.contextmanager
def _quiet_open_clip():
    """Hide open_clip's root-logger "initialized randomly" warning for ``pretrained=None``."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


def create_model(name, pretrained=None, *, device="cpu", precision="fp32", seed=0, freeze=True):
    """An open_clip model, its evaluation preprocess and its tokenizer.

    Args:
        name: architecture in ``open_clip.list_models()`` (or ``TINY_MODEL``), or an
            ``hf-hub:``/``local-dir:`` name handled by open_clip.
        pretrained: ``None`` (random init, seeded by ``seed``), a local weights file (a
            ``state_dict`` saved with ``torch.save``, or any checkpoint open_clip loads), or an
            open_clip pretrained tag such as ``"openai"`` (downloaded by open_clip).
        device, precision: passed to open_clip (``"fp32" | "fp16" | "bf16" | ...``).
        seed: seed of the random initialization when ``pretrained`` is None.
        freeze: ``eval()`` mode and ``requires_grad=False`` on every weight (CRoFT and OGEN keep
            both encoders frozen).
    Returns:
        ``(model, preprocess, tokenizer)``. ``model.vlood_fast_info`` is
        ``{"name", "weights"}`` with ``weights = weights_fingerprint(pretrained, seed)``
        (``"source:<name>"`` for hf-hub:/local-dir: names), ready for ``vlood_fast.cache.make_key``.
    Raises:
        ValueError for an unknown name (listing close names) or unknown tag;
        FileNotFoundError for a missing weights file.

    Example::

        model, preprocess, tokenizer = create_model("ViT-B-16", pretrained="weights/vit_b16.pt")
        txt = class_text_features(model, tokenizer, ["dog", "cat"])
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a model name (str), got {name!r}")
    schema = name.startswith(("hf-hub:", "local-dir:"))
    if not schema:
        known = open_clip.list_models()
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise ValueError(f"unknown model name {name!r}{hint} (see open_clip.list_models(); "
                             f"{TINY_MODEL!r} is a tiny test architecture)")
    if pretrained is not None:
        pretrained = os.fspath(pretrained)
        if looks_like_path(pretrained):
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(f"pretrained weights file {pretrained!r} does not exist")
        elif not schema:
            if not open_clip.pretrained.get_pretrained_cfg(name, pretrained):  # open_clip's tag lookup
                tags = open_clip.list_pretrained_tags_by_model(name)
                raise ValueError(f"pretrained {pretrained!r} is neither an existing file nor a known "
                                 f"tag of {name!r} (tags: {', '.join(tags) or 'none'})")
    # hf-hub:/local-dir: names carry their own weights (open_clip ignores `pretrained` for them)
    weights = f"source:{name}" if schema else weights_fingerprint(pretrained, seed)

    quiet = _quiet_open_clip() if pretrained is None else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), quiet:
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, precision=precision)
    tokenizer = open_clip.get_tokenizer(name)
    if freeze:
        model.eval()
        model.requires_grad_(False)
    model.vlood_fast_info = {"name": name, "weights": weights}
    return model, preprocess, tokenizer


def _model_device_dtype(model):
    param = next(model.parameters())
    return param.device, param.dtype


@contextlib.contextmanager
def _eval_mode(module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def class_text_features(model, tokenizer, classnames, templates=DEFAULT_TEMPLATE, *, batch_size=256):
    """Normalized text features per class from one template or a template ensemble.

    For each template the prompts ``template.format(name)`` are encoded and normalized; the
    ensemble averages over templates and normalizes again (CLIP's zero-shot recipe).

    Args:
        model, tokenizer: from ``create_model``.
        classnames: K class names (used as given; ``ImageFolderDataset.classnames`` replaces ``_``).
        templates: a format string with ``{}`` or a list of them.
        batch_size: prompts per encoder call.
    Returns:
        ``[K, D]`` float32 tensor on the model's device, rows of unit norm.

    Example::

        txt = class_text_features(model, tokenizer, ds.classnames, ["a photo of a {}.", "art of a {}."])
    """
    classnames = _check_classnames(classnames)
    if isinstance(templates, str):
        templates = [templates]
    templates = list(templates)
    if not templates:
        raise ValueError("templates must be a format string or a non-empty list of them")
    for t in templates:
        if not isinstance(t, str) or "{}" not in t:
            raise ValueError(f"each template must be a str holding '{{}}' for the class name, got {t!r}")
    device, _ = _model_device_dtype(model)
    prompts = [t.format(c) for c in classnames for t in templates]   # class-major
    rows = []
    with torch.no_grad(), _eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start:start + batch_size]).to(device)
            rows.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    features = torch.cat(rows).view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(features, dim=-1)


def encode_images(model, data, *, batch_size=64, num_workers=0, progress=True, desc="encoding images"):
    """Normalized image features and labels for a whole dataset, with a progress bar.

    Args:
        model: from ``create_model``.
        data: a Dataset yielding ``(image_tensor, label)`` (e.g. ``ImageFolderDataset`` with
            ``transform=preprocess``) or a DataLoader yielding ``(images, labels)`` batches.
        batch_size, num_workers: for the DataLoader built around a Dataset.
        progress: show a tqdm bar on stderr.
    Returns:
        ``(features [N, D] float32 on the CPU, labels [N] int64)`` in dataset order.

    Example::

        feats, labels = encode_images(model, ImageFolderDataset(root, transform=preprocess))
    """
    if isinstance(data, torch.utils.data.DataLoader):
        loader = data
    elif isinstance(data, torch.utils.data.Dataset):
        if len(data) > 0 and not isinstance(data[0][0], torch.Tensor):
            raise TypeError(f"the dataset yields {type(data[0][0]).__name__} images, not tensors; "
                            f"give it transform=preprocess (from create_model)")
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False,
                                             num_workers=num_workers)
    else:
        raise TypeError(f"data must be a torch Dataset or DataLoader, got {type(data).__name__}")
    device, dtype = _model_device_dtype(model.visual)
    features, labels = [], []
    with torch.no_grad(), _eval_mode(model):
        for batch in tqdm(loader, desc=desc, disable=not progress, unit="batch"):
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise TypeError("data must yield (images, labels) pairs")
            images, batch_labels = batch[0], batch[1]
            if not isinstance(images, torch.Tensor):
                raise TypeError(f"images must be tensors, got {type(images).__name__}; give the "
                                f"dataset transform=preprocess (from create_model)")
            out = model.encode_image(images.to(device=device, dtype=dtype))
            features.append(F.normalize(out.float(), dim=-1).cpu())
            labels.append(torch.as_tensor(batch_labels).long().cpu())
    if not features:
        raise ValueError("data is empty: no images to encode")
    return torch.cat(features), torch.cat(labels)


def _check_classnames(classnames):
    if isinstance(classnames, str):
        raise TypeError("classnames must be a list of class names, not a single str")
    classnames = list(classnames)
    if not classnames or not all(isinstance(c, str) and c.strip() for c in classnames):
        raise ValueError(f"classnames must be a non-empty list of non-empty str, got {classnames!r}")
    return classnames


# ---------------------------------------------------------------- CoOp prompt learner
def _is_causal(mask) -> bool:
    """True for open_clip's additive causal mask: 0 on and below the diagonal, -inf above."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    upper = torch.ones_like(mask, dtype=torch.bool).triu(1)
    return bool(torch.isneginf(mask[upper]).all()) and bool((mask[~upper] == 0).all())


class _TextTower:
    """The pieces of an open_clip text encoder, for CLIP and CustomTextCLIP(TextTransformer)."""

    def __init__(self, model):
        text = getattr(model, "text", None)
        if text is None and hasattr(model, "token_embedding"):
            src, pool = model, getattr(model, "text_pool_type", "argmax")
            eos_id = getattr(model, "text_eos_id", None)
        elif text is not None and hasattr(text, "token_embedding"):
            src, pool, eos_id = text, text.pool_type, getattr(text, "eos_id", None)
            if getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False):
                raise TypeError("PromptLearner does not support text towers with a class token or "
                                "padding masks (CoCa-style)")
        else:
            raise TypeError(f"PromptLearner needs an open_clip CLIP model with a transformer text "
                            f"tower, got {type(model).__name__}")
        self.token_embedding = src.token_embedding
        self.positional_embedding = src.positional_embedding
        self.transformer = src.transformer
        self.ln_final = src.ln_final
        self.text_projection = src.text_projection
        self.attn_mask = src.attn_mask
        self.pool_type, self.eos_id = pool, eos_id
        # Under a causal mask, token i sees only tokens <= i: the pooled token (the EOT for
        # argmax/eos pooling, the SOT for first) is the same whether or not the padding after
        # the last EOT goes through the transformer. "last" pooling reads the final position.
        self.trimmable = pool in ("argmax", "eos", "first") and _is_causal(self.attn_mask)
        self.modules = [src.token_embedding, src.transformer, src.ln_final]

    def pooled_positions(self, tokens) -> int:
        """The last position the pooling reads for any row of ``tokens`` [N, L]."""
        if self.pool_type == "first":
            return 0
        if self.pool_type == "eos":
            return int((tokens == self.eos_id).int().argmax(dim=1).max())
        return int(tokens.argmax(dim=1).max())  # argmax: CLIP's EOT has the largest token id

    def cast_dtype(self):
        get = getattr(self.transformer, "get_cast_dtype", None)
        return get() if get is not None else self.token_embedding.weight.dtype

    def encode(self, embeddings, tokens):
        """Text features ``[N, D]`` from token embeddings ``[N, L, W]`` and the token ids ``[N, L]``."""
        dtype = self.cast_dtype()
        x = embeddings.to(dtype) + self.positional_embedding[: embeddings.shape[1]].to(dtype)
        mask = self.attn_mask
        if mask is not None:
            mask = mask[: x.shape[1], : x.shape[1]]
        if getattr(self.transformer, "batch_first", False):
            x = self.transformer(x, attn_mask=mask)
        else:  # open_clip < 2.24: the transformer takes [L, N, W]
            x = self.transformer(x.permute(1, 0, 2), attn_mask=mask).permute(1, 0, 2)
        x = self.ln_final(x)
        x = open_clip.transformer.text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        if isinstance(x, tuple):  # older open_clip returns (pooled, tokens)
            x = x[0]
        if self.text_projection is not None:
            x = self.text_projection(x) if isinstance(self.text_projection, torch.nn.Linear) \
                else x @ self.text_projection
        return x


class PromptLearner(torch.nn.Module):
    """CoOp-style learnable context over a frozen open_clip text encoder (used by OGEN).

    Prompt per class: ``[SOT] ctx_1 .. ctx_n  <class name tokens> . [EOT]`` where the n context
    vectors (shared by all classes) are the only trainable parameters. The forward runs the
    text transformer once for all K classes.

    Args:
        model, tokenizer: from ``create_model`` (an open_clip CLIP with its BPE tokenizer).
        classnames: K class names.
        n_ctx: number of context vectors (default 4).
        ctx_init: text whose token embeddings initialize the context (default ``"a photo of a"``,
            4 tokens; it must tokenize to ``n_ctx`` tokens), or ``None`` for N(0, 0.02) init.
        trim: run the transformer only over the first ``L`` positions, L = one past the last
            end-of-text token of any prompt (default True). Exact: under the causal mask no
            position before it sees the padding. CLIP pads every prompt to 77 tokens while
            "a photo of a <name>." is ~10, so the forward and backward are several times
            cheaper. Ignored (full length) for towers without a causal mask or with "last"
            pooling; ``trim=False`` runs all positions, as CoOp's and OGEN's code do.
    Attributes:
        ctx: ``nn.Parameter [n_ctx, width]`` (float32), the only parameter of this module.
        The encoder is referenced, not registered: ``parameters()`` and ``state_dict()`` hold
        only ``ctx``; the text tower's weights are set to ``requires_grad=False``, and moving
        the learner with ``.to()`` does not move the model (move both).

    Example::

        learner = PromptLearner(model, tokenizer, base_classnames)
        opt = torch.optim.SGD(learner.parameters(), lr=2e-3)
        text = learner()                       # [K, D] normalized, differentiable w.r.t. ctx
        text_new = learner(new_classnames)     # same context, other classes
    """

    def __init__(self, model, tokenizer, classnames, n_ctx=4, ctx_init="a photo of a", trim=True):
        super().__init__()
        tower = _TextTower(model)
        for module in tower.modules:
            module.requires_grad_(False)
        for tensor in (tower.positional_embedding, tower.text_projection):
            if isinstance(tensor, torch.nn.Parameter):
                tensor.requires_grad_(False)
        if isinstance(tower.text_projection, torch.nn.Linear):
            tower.text_projection.requires_grad_(False)
        object.__setattr__(self, "_tower", tower)       # not a submodule: keeps parameters() = [ctx]
        self.tokenizer = tokenizer
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
        self.context_length = tower.positional_embedding.shape[0]
        weight = tower.token_embedding.weight
        if ctx_init is not None:
            ids = tokenizer([ctx_init]).to(weight.device)[0]
            count = int((ids != 0).sum()) - 2                  # without SOT and EOT
            if count != n_ctx:
                raise ValueError(f"ctx_init {ctx_init!r} tokenizes to {count} tokens but n_ctx={n_ctx}; "
                                 f"pass n_ctx={count} or another ctx_init")
            with torch.no_grad():
                ctx = tower.token_embedding(ids[1:1 + n_ctx][None])[0].float().clone()
            self.prompt_prefix = ctx_init
        else:
            ctx = torch.randn(n_ctx, weight.shape[1], device=weight.device) * 0.02
            self.prompt_prefix = " ".join(["X"] * n_ctx)
        self.n_ctx = n_ctx
        self.trim = bool(trim) and tower.trimmable
        self.ctx = torch.nn.Parameter(ctx)
        self.classnames = _check_classnames(classnames)
        tokens, prefix, suffix = self._class_tokens(self.classnames)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("token_prefix", prefix, persistent=False)
        self.register_buffer("token_suffix", suffix, persistent=False)

    def __deepcopy__(self, memo):
        """Copies share the frozen text tower and tokenizer: a teacher copy of this learner
        costs one context tensor, not a second text encoder."""
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            shared = key in ("_tower", "tokenizer")
            object.__setattr__(clone, key, value if shared else copy.deepcopy(value, memo))
        return clone

    def _class_tokens(self, classnames):
        classnames = _check_classnames(classnames)
        prompts = [f"{self.prompt_prefix} {name}." for name in classnames]
        encode = getattr(self.tokenizer, "encode", None)
        if encode is not None:
            for name, prompt in zip(classnames, prompts):
                if len(encode(prompt)) + 2 > self.context_length:
                    raise ValueError(f"the prompt for class {name!r} is longer than the text context "
                                     f"length {self.context_length}")
        tower = self._tower
        tokens = self.tokenizer(prompts).to(tower.token_embedding.weight.device)
        if self.trim:  # one past the last position any prompt pools from
            tokens = tokens[:, :max(tower.pooled_positions(tokens) + 1, 1 + self.n_ctx)]
        with torch.no_grad():
            embedding = tower.token_embedding(tokens)
        return tokens, embedding[:, :1], embedding[:, 1 + self.n_ctx:]

    def forward(self, classnames=None):
        """Normalized text features ``[K, D]`` (float32) for ``classnames`` (default: the learner's)."""
        if classnames is None:
            tokens, prefix, suffix = self.tokens, self.token_prefix, self.token_suffix
        else:
            tokens, prefix, suffix = self._class_tokens(classnames)
        ctx = self.ctx.to(prefix.dtype).unsqueeze(0).expand(prefix.shape[0], -1, -1)
        embeddings = torch.cat([prefix, ctx, suffix], dim=1)
        return F.normalize(self._tower.encode(embeddings, tokens).float(), dim=-1)
