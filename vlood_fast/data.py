"""Image folders (with an optional domain level), few-shot sampling and the base-to-new split.

Layouts::

    root/<class>/<image>                      # ImageFolderDataset(root)
    root/<domain>/<class>/<image>             # ImageFolderDataset(root, domains=[...]) (PACS, VLCS)

Order is deterministic: by class (sorted folder names, or the order of ``classes``), then by
domain (in the order given), then by file name. Pillow is imported only when an image is read.
"""
import math
import random
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

__all__ = [
    "IMAGE_EXTENSIONS", "ImageFolderDataset", "SeededViews", "base_new_split", "few_shot_indices",
    "leave_one_domain_out", "list_domains", "make_synthetic_image_folder",
]


def _subfolders(path: Path):
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path, extensions):
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions)


def _existing_dir(name: str, path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{name} {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{name} {str(path)!r} is not a directory")
    return path


def list_domains(root) -> list:
    """Sorted domain folder names under ``root`` (layout ``root/<domain>/<class>/<image>``)."""
    domains = _subfolders(_existing_dir("root", root))
    if not domains:
        raise ValueError(f"root {str(root)!r} has no domain folders")
    return domains


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images in one folder per class, optionally one folder per domain above that.

    Args:
        root: dataset directory.
        classes: class folder names to use, in label order (default: all, sorted). A subset
            relabels to ``0..len(classes)-1``, e.g. for base or new classes.
        transform: callable applied to the RGB ``PIL.Image`` (e.g. an open_clip preprocess).
        domains: ``None`` for ``root/<class>/<image>``; a list of domain folder names (or
            ``"all"``) for ``root/<domain>/<class>/<image>``.
        extensions: accepted file suffixes (case-insensitive).
    Attributes:
        classes (folder names), classnames (``_`` -> space, for prompts), domains,
        files ``[N]`` paths, labels ``[N]`` ints, domain_labels ``[N]`` indices into domains.
    Items:
        ``(transform(image), label)``.
    Raises:
        FileNotFoundError for a missing root, domain or requested class; ValueError for no
        classes or a class folder holding no images.

    Example::

        ds = ImageFolderDataset("PACS", domains=["photo", "sketch"], transform=preprocess)
        image, label = ds[0]; ds.classnames[label], ds.domains[ds.domain_labels[0]]
    """

    def __init__(self, root, classes=None, transform=None, domains=None, extensions=IMAGE_EXTENSIONS):
        self.root = _existing_dir("root", root)
        self.transform = transform
        extensions = tuple(e.lower() for e in extensions)
        if domains is None:
            self.domains = []
            domain_dirs = [self.root]
        else:
            if isinstance(domains, str):
                domains = list_domains(self.root) if domains == "all" else [domains]
            self.domains = list(domains)
            if not self.domains:
                raise ValueError("domains must name at least one domain folder (or be None / 'all')")
            domain_dirs = [_existing_dir(f"domain {d!r} under root", self.root / d) for d in self.domains]

        if classes is None:
            found = sorted({c for d in domain_dirs for c in _subfolders(d)})
            if not found:
                where = "domain folders" if self.domains else "root"
                layout = "root/<domain>/<class>/<image>" if self.domains else "root/<class>/<image>"
                raise ValueError(f"no class folders found in the {where} of {str(self.root)!r}; "
                                 f"expected {layout}")
            classes = found
        self.classes = list(classes)
        if not self.classes:
            raise ValueError("classes must be a non-empty list of class folder names")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be unique, got {self.classes}")

        self.files, self.labels, self.domain_labels = [], [], []
        for label, name in enumerate(self.classes):
            present = [(i, d / name) for i, d in enumerate(domain_dirs) if (d / name).is_dir()]
            if not present:
                where = "any selected domain of " if self.domains else ""
                raise FileNotFoundError(f"class folder {name!r} not found under {where}{str(self.root)!r}")
            for domain_index, folder in present:
                images = _images(folder, extensions)
                if not images:
                    raise ValueError(f"class folder {str(folder)!r} holds no images with suffix in "
                                     f"{', '.join(extensions)}")
                self.files.extend(str(p) for p in images)
                self.labels.extend([label] * len(images))
                self.domain_labels.extend([domain_index] * len(images))
        self.classnames = [c.replace("_", " ") for c in self.classes]

    def __len__(self):
        return len(self.files)

    def image(self, index):
        """The RGB ``PIL.Image`` at ``index``, before the transform."""
        from PIL import Image
        with Image.open(self.files[index]) as img:
            return img.convert("RGB")

    def __getitem__(self, index):
        img = self.image(index)
        return (self.transform(img) if self.transform is not None else img), self.labels[index]

    def __repr__(self):
        domains = f", domains={self.domains}" if self.domains else ""
        return (f"ImageFolderDataset(root={str(self.root)!r}, {len(self.classes)} classes, "
                f"{len(self)} images{domains})")


def leave_one_domain_out(root, held_out, classes=None, train_transform=None, test_transform=None):
    """(train, test) datasets: every domain but ``held_out`` for training, ``held_out`` for testing.

    Example::

        train, test = leave_one_domain_out("PACS", "sketch", train_transform=aug, test_transform=pre)
    """
    domains = list_domains(root)
    if held_out not in domains:
        raise ValueError(f"held_out must be one of the domains {domains}, got {held_out!r}")
    train = ImageFolderDataset(root, classes, train_transform, [d for d in domains if d != held_out])
    test = ImageFolderDataset(root, train.classes, test_transform, [held_out])
    return train, test


def few_shot_indices(labels, shots, seed=0) -> list:
    """Seeded, class-balanced few-shot subset: exactly ``shots`` indices per class, sorted.

    Each class draws with its own generator seeded by ``(seed, class)``, so one class's picks do
    not depend on the other classes.

    Args:
        labels: ``[N]`` integer labels (list, array or tensor).
        shots: positive int.
        seed: int.
    Returns:
        sorted list of ``shots * C`` dataset indices.

    Example::

        subset = torch.utils.data.Subset(ds, few_shot_indices(ds.labels, shots=16, seed=1))
    """
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-D integer sequence [N], got shape "
                         f"{labels.shape} dtype {labels.dtype}")
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ValueError(f"shots must be a positive int, got {shots!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if members.size < shots:
            raise ValueError(f"class {int(c)} has {members.size} samples, fewer than shots={shots}")
        rng = np.random.default_rng([int(seed), int(c)])
        chosen.append(rng.choice(members, size=shots, replace=False))
    return sorted(int(i) for i in np.concatenate(chosen))


def base_new_split(classnames):
    """Base-to-new split: the first ``ceil(C / 2)`` classes are base, the rest new.

    Returns:
        ``(base, new)`` lists of class names, in the input order.

    Example::

        base, new = base_new_split(ds.classes)
        train = ImageFolderDataset(root, classes=base)      # labels 0..len(base)-1
    """
    classnames = list(classnames)
    if len(classnames) < 2:
        raise ValueError(f"base_new_split needs at least 2 classes, got {len(classnames)}")
    cut = math.ceil(len(classnames) / 2)
    return classnames[:cut], classnames[cut:]


class SeededViews(torch.utils.data.Dataset):
    """Reproducible augmented views: item i of epoch e is a pure function of (i, e, seed).

    The random transform runs under torch and Python RNGs seeded from ``(seed, epoch, index)``
    (global RNG state is restored afterwards), so the view features of an epoch can be cached
    and reused (``vlood_fast.cache.make_key(..., epoch=e, aug_seed=seed)``) whatever the loader
    order or worker count.

    Args:
        dataset: an ``ImageFolderDataset`` (its own transform is ignored).
        transform: random augmentation on the PIL image (torchvision transforms use torch's RNG).
        epoch, seed: non-negative ints.

    Example::

        views = SeededViews(train_ds, train_transform, epoch=3, seed=0)
        image, label = views[17]          # identical on every call
    """

    def __init__(self, dataset, transform, epoch=0, seed=0):
        for name, value in (("epoch", epoch), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        self.dataset, self.transform, self.epoch, self.seed = dataset, transform, epoch, seed

    def __len__(self):
        return len(self.dataset)

    def item_seed(self, index) -> int:
        return int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0])

    def __getitem__(self, index):
        img = self.dataset.image(index)
        item_seed = self.item_seed(index)
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed)
                random.seed(item_seed)
                view = self.transform(img)
        finally:
            random.setstate(py_state)
        return view, self.dataset.labels[index]


# ---------------------------------------------------------------- synthetic data
def make_synthetic_image_folder(root, classes, per_class=4, size=32, seed=0, domains=None):
    """Write a tiny image folder of coloured stripe patterns (PNG), one pattern family per class.

    Each class has its own colour and stripe orientation/frequency; images jitter phase, colour
    and noise. A domain changes the rendering style (inverted, grayscale, low contrast, ...),
    giving a small covariate shift for leave-one-domain-out tests and demos.

    Args:
        root: output directory (created; existing files with the same names are overwritten).
        classes: class folder names, or an int C for ``class_00..class_{C-1}``.
        per_class: images per class (and per domain).
        size: image side in pixels.
        seed: int; the same arguments always produce the same pixels.
        domains: ``None`` (layout ``root/<class>/``) or domain names (``root/<domain>/<class>/``).
    Returns:
        ``Path(root)``.

    Example::

        root = make_synthetic_image_folder(tmp_path / "toy", ["cat", "dog"], per_class=3, size=32)
        ds = ImageFolderDataset(root)
    """
    from PIL import Image

    if isinstance(classes, int):
        classes = [f"class_{i:02d}" for i in range(classes)]
    classes = list(classes)
    if not classes:
        raise ValueError("classes must be a positive int or a non-empty list of names")
    if per_class < 1 or size < 4:
        raise ValueError(f"per_class must be >= 1 and size >= 4, got per_class={per_class}, size={size}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    for d_index, domain in enumerate([None] if domains is None else list(domains)):
        base_dir = root if domain is None else root / domain
        for c_index, name in enumerate(classes):
            folder = base_dir / name
            folder.mkdir(parents=True, exist_ok=True)
            hue = c_index / len(classes)
            colour = 0.5 + 0.5 * np.cos(2 * np.pi * (hue + np.array([0.0, 1 / 3, 2 / 3])))
            angle = np.pi * ((c_index * 0.618) % 1.0)
            freq = 2 + (c_index % 4)
            for i in range(per_class):
                phase = rng.uniform(0, 2 * np.pi)
                along = np.cos(angle) * xx + np.sin(angle) * yy
                wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * along + phase)
                tint = np.clip(colour + rng.normal(0, 0.05, 3), 0, 1)
                img = wave[..., None] * tint + (1 - wave[..., None]) * (1 - tint) * 0.3
                img = _domain_style(img, d_index) + rng.normal(0, 0.03, img.shape)
                pixels = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
                Image.fromarray(pixels, "RGB").save(folder / f"{name}_{i:04d}.png")
    return root


def _domain_style(img, d_index):
    style = d_index % 4
    if style == 1:
        return 1.0 - img                                   # inverted ("sketch")
    if style == 2:
        return np.repeat(img.mean(axis=2, keepdims=True), 3, axis=2)   # grayscale
    if style == 3:
        return 0.25 + 0.5 * img                            # low contrast
    return img
