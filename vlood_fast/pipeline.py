"""End-to-end runs on open_clip models and image folders: what ``vlood-fast`` executes.

Every image set is encoded at most once per (model, weights, files, transform): features go
through a ``FeatureCache`` (default folder ``.vlood_cache``), so evaluating every epoch, or
re-running a command, costs no encoder passes. A run folder holds ``run.json`` (what was run,
with which model), ``metrics.jsonl``, ``last.pt`` and ``best.pt``.
"""
import dataclasses
import json
import pathlib

import torch

from .cache import FeatureCache, make_key
from .loop import TrainConfig

DEFAULT_CACHE = ".vlood_cache"


@dataclasses.dataclass
class Encoder:
    """A frozen open_clip model with its preprocess, tokenizer and cache identity."""
    name: str
    pretrained: str | None
    model: object
    preprocess: object
    tokenizer: object
    cache: FeatureCache
    progress: bool = True

    @classmethod
    def load(cls, name, pretrained=None, cache_dir=DEFAULT_CACHE, device="cpu", progress=True):
        from .clip import create_model
        model, preprocess, tokenizer = create_model(name, pretrained, device=device)
        return cls(name, pretrained, model, preprocess, tokenizer, FeatureCache(cache_dir), progress)

    @property
    def weights(self) -> str:
        return self.model.vlood_fast_info["weights"]

    def images(self, dataset, name: str, label: str = "images"):
        """(features [N, D], labels [N]) of an ``ImageFolderDataset``, from the cache if fresh.

        ``name`` identifies the set (its folder): the same folder hits the same cache entry
        whichever command or role (train, val, eval) asks for it."""
        from .clip import encode_images
        key = make_key(name, model=self.name, weights=self.weights, files=dataset.files,
                       transform=self.preprocess)

        def compute():
            feats, labels = encode_images(self.model, dataset, progress=self.progress,
                                          desc=f"encoding {label}")
            return {"features": feats, "labels": labels}

        entry = self.cache.get_or_compute(key, compute)
        return entry["features"], entry["labels"]

    def text(self, classnames, templates=("a photo of a {}.",)):
        from .clip import class_text_features
        with torch.no_grad():
            return class_text_features(self.model, self.tokenizer, classnames, list(templates)).float()


def _dataset(root, classes=None, domains=None, transform=None):
    from .data import ImageFolderDataset
    return ImageFolderDataset(root, classes=classes, transform=transform, domains=domains)


def _few_shot(features, labels, shots, seed):
    if not shots:
        return features, labels
    from .data import few_shot_indices
    idx = torch.as_tensor(few_shot_indices(labels, shots, seed))
    return features[idx], labels[idx]


def _write_run(out_dir, info: dict):
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(info, indent=1, default=str))


def extract(encoder: Encoder, root, *, domains=None, split="data"):
    """Encode a class-folder image set into the cache; returns (features, labels, classnames)."""
    ds = _dataset(root, domains=domains, transform=encoder.preprocess)
    name = str(pathlib.Path(root).resolve()) + (f"|domains={domains}" if domains else "")
    feats, labels = encoder.images(ds, name, label=split)
    return feats, labels, ds.classnames


def run_croft(encoder: Encoder, train_root, *, out_dir, val_root=None, ood_root=None, shots=None,
              config: TrainConfig | None = None, templates=("a photo of a {}.",), domains=None,
              wccf=True, preset="setup1"):
    """CRoFT on cached features of ``train_root``; evaluates on ``val_root`` / ``ood_root``."""
    from .train import train_croft
    config = config or TrainConfig()
    train_x, train_y, classnames = extract(encoder, train_root, domains=domains, split="train")
    train_x, train_y = _few_shot(train_x, train_y, shots, config.seed)
    text = encoder.text(classnames, templates)
    eval_sets, ood_sets = {}, {}
    if val_root is not None:
        vx, vy, val_names = extract(encoder, val_root, split="val")
        if val_names != classnames:
            raise ValueError(f"val set classes {val_names} differ from the training classes {classnames}")
        eval_sets["val"] = (vx, vy)
    if ood_root is not None:
        ox, _, _ = extract(encoder, ood_root, split="ood")
        ood_sets["ood"] = ox
    _write_run(out_dir, dict(method="croft", model=encoder.name, pretrained=encoder.pretrained,
                             classnames=classnames, templates=list(templates), shots=shots,
                             wccf=wccf, preset=preset, config=dataclasses.asdict(config)))
    config = dataclasses.replace(config, out_dir=str(out_dir))
    result = train_croft(train_x, train_y, text, eval_sets=eval_sets, ood_sets=ood_sets,
                         config=config, wccf=wccf, preset=preset)
    return result


def run_ogen(encoder: Encoder, train_root, *, out_dir, test_root=None, shots=None,
             config: TrainConfig | None = None, domains=None, joint=False):
    """OGEN on the base classes of ``train_root`` (first ceil(C/2) class folders), with a
    CoOp prompt learner over all class names; ``test_root`` scores base and new classes."""
    from .clip import PromptLearner
    from .data import base_new_split
    from .train import train_ogen
    config = config or TrainConfig()
    x, y, classnames = extract(encoder, train_root, domains=domains, split="train")
    base, new = base_new_split(classnames)
    keep = y < len(base)
    x, y = _few_shot(x[keep], y[keep], shots, config.seed)
    learner = PromptLearner(encoder.model, encoder.tokenizer, base + new)
    eval_sets = {}
    if test_root is not None:
        tx, ty, test_names = extract(encoder, test_root, split="test")
        if test_names != classnames:
            raise ValueError(f"test set classes {test_names} differ from the training classes {classnames}")
        is_base = ty < len(base)
        eval_sets = {"base": (tx[is_base], ty[is_base]), "new": (tx[~is_base], ty[~is_base] - len(base))}
    _write_run(out_dir, dict(method="ogen", model=encoder.name, pretrained=encoder.pretrained,
                             classnames=classnames, base=base, new=new, shots=shots, joint=joint,
                             config=dataclasses.asdict(config)))
    config = dataclasses.replace(config, out_dir=str(out_dir))
    return train_ogen(x, y, learner, len(base), eval_sets=eval_sets, config=config, joint=joint)


def evaluate_run(run_dir, data_root, *, ood_root=None, cache_dir=DEFAULT_CACHE, progress=True):
    """Metrics of a finished run's best checkpoint on an image set (and an OOD set)."""
    from .ood import harmonic_mean, ood_metrics
    from .ops.similarity_lse import similarity_logsumexp
    run = pathlib.Path(run_dir)
    if not (run / "run.json").exists() or not (run / "best.pt").exists():
        raise FileNotFoundError(f"{run} is not a finished vlood-fast run (needs run.json and best.pt)")
    info = json.loads((run / "run.json").read_text())
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=False)["modules"]
    encoder = Encoder.load(info["model"], info["pretrained"], cache_dir, progress=progress)
    x, y, classnames = extract(encoder, data_root, split="eval")
    if classnames != info["classnames"]:
        raise ValueError(f"{data_root} has classes {classnames}, the run was trained on {info['classnames']}")
    if info["method"] == "croft":
        from .croft import CroftAdapter
        text = encoder.text(classnames, info["templates"])
        adapter = CroftAdapter(text.shape[1])
        adapter.load_state_dict(best["adapter"])
        with torch.no_grad():
            u, v = adapter.image(x), adapter.text(text)
            metrics = {"acc": ((u @ v.t()).argmax(1) == y).float().mean().item()}
            if ood_root is not None:
                ox, _, _ = extract(encoder, ood_root, split="ood")
                metrics.update(ood_metrics(similarity_logsumexp(u, v, 100.0),
                                           similarity_logsumexp(adapter.image(ox), v, 100.0)))
        return metrics
    from .clip import PromptLearner
    learner = PromptLearner(encoder.model, encoder.tokenizer, info["base"] + info["new"])
    learner.load_state_dict(best["text_model"])
    nb = len(info["base"])
    with torch.no_grad():
        text = learner()
        is_base = y < nb
        base = ((x[is_base] @ text[:nb].t()).argmax(1) == y[is_base]).float().mean().item()
        new = ((x[~is_base] @ text[nb:].t()).argmax(1) == y[~is_base] - nb).float().mean().item()
    return {"base_acc": base, "new_acc": new, "hm": harmonic_mean(base, new)}
