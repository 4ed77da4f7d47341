"""open_clip glue on the tiny random architecture (no downloads): models, features, prompts."""
import pytest
import torch
import torch.nn.functional as F

from vlood_fast.clip import (TINY_MODEL, PromptLearner, class_text_features, create_model,
                             encode_images)
from vlood_fast.data import ImageFolderDataset, make_synthetic_image_folder

NAMES = ["dog", "golden retriever", "sea turtle"]


@pytest.fixture(scope="module")
def tiny():
    return create_model(TINY_MODEL, seed=0)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    return make_synthetic_image_folder(tmp_path_factory.mktemp("img"), ["a", "b", "c"], per_class=4,
                                       size=40, seed=3)


def _encode(model, tokenizer, prompts):
    with torch.no_grad():
        return F.normalize(model.encode_text(tokenizer(prompts)).float(), dim=-1)


# ---------------------------------------------------------------- create_model
def test_create_model_random_init_is_seeded_and_frozen(tiny):
    model, preprocess, tokenizer = tiny
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.vlood_fast_info == {"name": TINY_MODEL, "weights": "random-init:0"}
    same, _, _ = create_model(TINY_MODEL, seed=0)
    other, _, _ = create_model(TINY_MODEL, seed=1)
    a, b, c = (dict(m.state_dict()) for m in (model, same, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.conv1.weight"], c["visual.conv1.weight"])
    assert tokenizer(["a photo of a dog."]).shape == (1, 32)
    from PIL import Image
    x = preprocess(Image.new("RGB", (50, 40), (200, 30, 60)))
    assert x.shape == (3, 32, 32)


def test_create_model_from_local_weights_file(tmp_path):
    source, _, _ = create_model(TINY_MODEL, seed=5)
    path = tmp_path / "tiny_weights.pt"
    torch.save(source.state_dict(), path)
    loaded, _, _ = create_model(TINY_MODEL, pretrained=str(path), seed=0)
    src = source.state_dict()
    assert all(torch.equal(v, src[k]) for k, v in loaded.state_dict().items())
    weights = loaded.vlood_fast_info["weights"]
    assert weights.startswith("sha256:") and len(weights) == len("sha256:") + 64


def test_create_model_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model name 'ViT-B-23'.*close names: .*ViT-B-32"):
        create_model("ViT-B-23")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_model(TINY_MODEL, pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="neither an existing file nor a known tag"):
        create_model(TINY_MODEL, pretrained="laion-nonexistent")
    with pytest.raises(ValueError, match=r"known tag of 'ViT-B-32' \(tags: openai, "):
        create_model("ViT-B-32", pretrained="nope")          # rejected before any download


# ---------------------------------------------------------------- text features
def test_single_template_matches_encode_text(tiny):
    model, _, tokenizer = tiny
    txt = class_text_features(model, tokenizer, NAMES, "a photo of a {}.", batch_size=2)
    assert txt.shape == (3, 32) and txt.dtype == torch.float32
    torch.testing.assert_close(txt, _encode(model, tokenizer, [f"a photo of a {n}." for n in NAMES]))


def test_template_ensemble_is_mean_of_normalized_then_renormalized(tiny):
    model, _, tokenizer = tiny
    templates = ["a photo of a {}.", "a sketch of the {}.", "itap of a {}."]
    txt = class_text_features(model, tokenizer, NAMES, templates, batch_size=4)
    per_template = torch.stack([_encode(model, tokenizer, [t.format(n) for n in NAMES]) for t in templates])
    torch.testing.assert_close(txt, F.normalize(per_template.mean(0), dim=-1))
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(3))
    assert not torch.allclose(txt, per_template[0], atol=1e-3)       # the ensemble changes them


def test_text_feature_errors(tiny):
    model, _, tokenizer = tiny
    with pytest.raises(ValueError, match="holding '\\{\\}'"):
        class_text_features(model, tokenizer, NAMES, "a photo")
    with pytest.raises(TypeError, match="not a single str"):
        class_text_features(model, tokenizer, "dog")
    with pytest.raises(ValueError, match="non-empty list"):
        class_text_features(model, tokenizer, [])


# ---------------------------------------------------------------- image features
def test_encode_images_dataset_and_loader(tiny, image_root, capsys):
    model, preprocess, _ = tiny
    ds = ImageFolderDataset(image_root, transform=preprocess)
    feats, labels = encode_images(model, ds, batch_size=5, progress=True, desc="toy-images")
    assert "toy-images" in capsys.readouterr().err                    # tqdm bar shown
    assert feats.shape == (12, 32) and feats.dtype == torch.float32 and labels.tolist() == ds.labels
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(12))
    with torch.no_grad():
        direct = F.normalize(model.encode_image(torch.stack([ds[i][0] for i in range(12)])), dim=-1)
    torch.testing.assert_close(feats, direct, rtol=1e-5, atol=1e-6)
    loader = torch.utils.data.DataLoader(ds, batch_size=12)
    feats2, _ = encode_images(model, loader, progress=False)
    assert capsys.readouterr().err == ""                                # progress=False: silent
    torch.testing.assert_close(feats2, feats, rtol=1e-5, atol=1e-6)
    assert feats.std(0).mean() > 1e-3                                   # not a constant output


def test_encode_images_errors(tiny, image_root):
    model, _, _ = tiny
    with pytest.raises(TypeError, match="transform=preprocess"):
        encode_images(model, ImageFolderDataset(image_root), progress=False)
    with pytest.raises(TypeError, match="Dataset or DataLoader"):
        encode_images(model, [1, 2, 3], progress=False)


# ---------------------------------------------------------------- prompt learner
def test_prompt_learner_init_reproduces_the_template(tiny):
    model, _, tokenizer = tiny
    learner = PromptLearner(model, tokenizer, NAMES)
    assert [name for name, _ in learner.named_parameters()] == ["ctx"]
    assert learner.ctx.shape == (4, 32) and list(learner.state_dict()) == ["ctx"]
    out = learner()
    assert out.shape == (3, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, _encode(model, tokenizer, [f"a photo of a {n}." for n in NAMES]),
                               rtol=1e-5, atol=1e-6)
    new = ["sea lion", "zebra"]
    torch.testing.assert_close(learner(new), _encode(model, tokenizer, [f"a photo of a {n}." for n in new]),
                               rtol=1e-5, atol=1e-6)


def test_prompt_learner_trains_only_ctx(tiny):
    model, _, tokenizer = tiny
    learner = PromptLearner(model, tokenizer, NAMES)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(learner.parameters(), lr=1.0)
    target = torch.tensor([2, 0, 1])
    losses = []
    for _ in range(5):
        logits = 10 * learner() @ learner().detach().roll(1, 0).T
        loss = F.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the learned context now differs from the template
    assert not torch.allclose(learner(), _encode(model, tokenizer, [f"a photo of a {n}." for n in NAMES]),
                              atol=1e-4)


def test_prompt_learner_trim_is_exact(tiny):
    """Stopping the transformer after the last EOT changes nothing under the causal mask:
    same features, same context gradient, for the learner's classes and for others."""
    model, _, tokenizer = tiny
    torch.manual_seed(0)
    full = PromptLearner(model, tokenizer, NAMES, trim=False)
    trimmed = PromptLearner(model, tokenizer, NAMES)
    with torch.no_grad():  # a context away from the template, shared by both
        full.ctx.add_(0.1 * torch.randn_like(full.ctx))
        trimmed.ctx.copy_(full.ctx)
    assert trimmed.trim and not full.trim
    assert trimmed.tokens.shape[1] < full.tokens.shape[1] == full.context_length
    weights = torch.randn(3, 32)
    for names in (None, ["sea lion", "a much longer class name"]):
        a, b = full(names), trimmed(names)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        ga, = torch.autograd.grad((a * weights[:a.shape[0]]).sum(), full.ctx)
        gb, = torch.autograd.grad((b * weights[:b.shape[0]]).sum(), trimmed.ctx)
        assert (gb - ga).abs().max() <= 1e-4 * ga.abs().max()  # fp32 rounding of other GEMM shapes


def test_prompt_learner_random_init_and_errors(tiny):
    model, _, tokenizer = tiny
    torch.manual_seed(0)
    learner = PromptLearner(model, tokenizer, NAMES, n_ctx=2, ctx_init=None)
    assert learner.ctx.shape == (2, 32) and 0.005 < learner.ctx.std() < 0.05
    out = learner()
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    # replacing the placeholder "x x" embeddings by ctx reproduces encode_text of "x x <name>."
    with torch.no_grad():
        learner.ctx.copy_(model.token_embedding(tokenizer(["x x"]))[0, 1:3])
    torch.testing.assert_close(learner(), _encode(model, tokenizer, [f"X X {n}." for n in NAMES]),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="tokenizes to 4 tokens but n_ctx=2"):
        PromptLearner(model, tokenizer, NAMES, n_ctx=2)
    with pytest.raises(ValueError, match="longer than the text context length 32"):
        PromptLearner(model, tokenizer, [" ".join(["word"] * 40)])
