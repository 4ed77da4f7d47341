"""Image folders, domains, few-shot sampling, base/new split, seeded views, synthetic data."""
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from vlood_fast.data import (ImageFolderDataset, SeededViews, base_new_split, few_shot_indices,
                             leave_one_domain_out, list_domains, make_synthetic_image_folder)


@pytest.fixture(scope="module")
def flat_root(tmp_path_factory):
    return make_synthetic_image_folder(tmp_path_factory.mktemp("flat"), ["zebra", "apple_tree", "cat"],
                                       per_class=3, size=16, seed=1)


@pytest.fixture(scope="module")
def domain_root(tmp_path_factory):
    return make_synthetic_image_folder(tmp_path_factory.mktemp("pacs"), ["dog", "horse"], per_class=2,
                                       size=16, seed=2, domains=["photo", "sketch", "art"])


def test_flat_layout_sorted_and_labelled(flat_root):
    ds = ImageFolderDataset(flat_root)
    assert ds.classes == ["apple_tree", "cat", "zebra"]
    assert ds.classnames == ["apple tree", "cat", "zebra"]
    assert len(ds) == 9 and ds.labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert ds.files == sorted(ds.files)                      # class folders and names sorted
    image, label = ds[4]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (16, 16)
    assert label == 1 and "/cat/" in ds.files[4]
    # deterministic: a second scan gives the same order
    assert ImageFolderDataset(flat_root).files == ds.files


def test_class_subset_relabels_and_transform(flat_root):
    ds = ImageFolderDataset(flat_root, classes=["zebra", "cat"], transform=lambda im: np.asarray(im).mean())
    assert ds.labels == [0, 0, 0, 1, 1, 1] and all("/zebra/" in f for f in ds.files[:3])
    value, label = ds[0]
    assert isinstance(value, float) and 0 < value < 255 and label == 0


def test_domain_layout(domain_root):
    assert list_domains(domain_root) == ["art", "photo", "sketch"]
    ds = ImageFolderDataset(domain_root, domains=["sketch", "photo"])
    assert ds.domains == ["sketch", "photo"] and ds.classes == ["dog", "horse"]
    assert len(ds) == 8
    # class-major, then domains in the order given
    assert [ds.domains[d] for d in ds.domain_labels] == (["sketch"] * 2 + ["photo"] * 2) * 2
    assert all(f"/{ds.domains[d]}/{ds.classes[y]}/" in f
               for f, y, d in zip(ds.files, ds.labels, ds.domain_labels))
    assert len(ImageFolderDataset(domain_root, domains="all")) == 12


def test_leave_one_domain_out(domain_root):
    train, test = leave_one_domain_out(domain_root, "sketch")
    assert train.domains == ["art", "photo"] and test.domains == ["sketch"]
    assert len(train) == 8 and len(test) == 4 and train.classes == test.classes
    assert not set(train.files) & set(test.files)
    with pytest.raises(ValueError, match="held_out must be one of the domains"):
        leave_one_domain_out(domain_root, "cartoon")


def test_domain_styles_differ(domain_root):
    ds = ImageFolderDataset(domain_root, domains="all")
    means = {}
    for i in range(len(ds)):
        means.setdefault(ds.domains[ds.domain_labels[i]], []).append(np.asarray(ds.image(i), float))
    photo, sketch = np.mean(means["photo"], axis=0), np.mean(means["sketch"], axis=0)
    assert np.abs(photo - sketch).mean() > 20          # inverted style: a real covariate shift


def test_dataset_errors(tmp_path, flat_root):
    with pytest.raises(FileNotFoundError, match="root .* does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolderDataset(tmp_path / "empty_root")
    (tmp_path / "r" / "a").mkdir(parents=True)
    (tmp_path / "r" / "b").mkdir()
    Image.new("RGB", (4, 4), (9, 99, 199)).save(tmp_path / "r" / "a" / "x.png")
    (tmp_path / "r" / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolderDataset(tmp_path / "r")
    assert len(ImageFolderDataset(tmp_path / "r", classes=["a"])) == 1
    with pytest.raises(FileNotFoundError, match="class folder 'dog' not found"):
        ImageFolderDataset(flat_root, classes=["cat", "dog"])
    with pytest.raises(FileNotFoundError, match="domain 'photo'"):
        ImageFolderDataset(flat_root, domains=["photo"])
    with pytest.raises(ValueError, match="classes must be a non-empty"):
        ImageFolderDataset(flat_root, classes=[])


def test_synthetic_folder_is_deterministic_and_class_dependent(tmp_path):
    a = ImageFolderDataset(make_synthetic_image_folder(tmp_path / "a", 3, per_class=2, size=24, seed=5))
    b = ImageFolderDataset(make_synthetic_image_folder(tmp_path / "b", 3, per_class=2, size=24, seed=5))
    c = ImageFolderDataset(make_synthetic_image_folder(tmp_path / "c", 3, per_class=2, size=24, seed=6))
    assert a.classes == ["class_00", "class_01", "class_02"]
    pix = [np.asarray(a.image(i)) for i in range(len(a))]
    assert all(np.array_equal(p, np.asarray(b.image(i))) for i, p in enumerate(pix))
    assert not np.array_equal(pix[0], np.asarray(c.image(0)))
    assert pix[0].shape == (24, 24, 3) and pix[0].std() > 10
    # class means differ more between classes than within one
    mean = [p.reshape(-1, 3).mean(0) for p in pix]
    assert np.abs(mean[0] - mean[2]).sum() > np.abs(mean[0] - mean[1]).sum()


# ---------------------------------------------------------------- few-shot, base/new
def test_few_shot_balanced_seeded_and_class_independent():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 300)
    idx = few_shot_indices(labels, shots=4, seed=3)
    assert idx == sorted(idx) and len(set(idx)) == 20
    assert np.bincount(labels[idx], minlength=5).tolist() == [4] * 5
    assert few_shot_indices(torch.from_numpy(labels), 4, 3) == idx      # tensors accepted
    assert few_shot_indices(labels, 4, 4) != idx                        # the seed matters
    # dropping class 4 leaves the picks of classes 0..3 unchanged
    keep = np.flatnonzero(labels != 4)
    sub = few_shot_indices(labels[keep], 4, 3)
    assert sorted(keep[sub].tolist()) == [i for i in idx if labels[i] != 4]


def test_few_shot_errors():
    with pytest.raises(ValueError, match="class 1 has 2 samples, fewer than shots=3"):
        few_shot_indices([0, 0, 0, 1, 1], shots=3)
    with pytest.raises(ValueError, match="shots must be a positive int"):
        few_shot_indices([0, 1], shots=0)
    with pytest.raises(ValueError, match="labels must be a non-empty 1-D integer"):
        few_shot_indices([0.5, 1.0], shots=1)


@pytest.mark.parametrize("count", [2, 3, 7, 10])
def test_base_new_split(count):
    names = [f"c{i}" for i in range(count)]
    base, new = base_new_split(names)
    assert len(base) == math.ceil(count / 2) and base + new == names
    with pytest.raises(ValueError, match="at least 2 classes"):
        base_new_split(names[:1])


def test_seeded_views_reproducible_and_restore_rng(flat_root):
    ds = ImageFolderDataset(flat_root)

    def augment(img):  # uses both torch's and Python's RNG, like torchvision transforms
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32))
        return arr * torch.rand(1) + random.random()

    views = SeededViews(ds, augment, epoch=2, seed=7)
    torch.manual_seed(123)
    random.seed(123)
    before = (torch.rand(1), random.random())
    torch.manual_seed(123)
    random.seed(123)
    first = views[5][0]
    after = (torch.rand(1), random.random())
    assert before == after                                   # global RNG state untouched
    assert torch.equal(first, views[5][0])                   # same (index, epoch, seed) -> same view
    assert views[5][1] == ds.labels[5]
    assert not torch.equal(first, SeededViews(ds, augment, epoch=3, seed=7)[5][0])
    assert not torch.equal(first, SeededViews(ds, augment, epoch=2, seed=8)[5][0])
    with pytest.raises(ValueError, match="epoch must be a non-negative int"):
        SeededViews(ds, augment, epoch=-1)
