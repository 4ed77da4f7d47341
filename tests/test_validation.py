"""Bad inputs fail early with errors that name the argument; dispatch picks the right backend."""
import pytest
import torch

import vlood_fast
from vlood_fast.dispatch import ENV_VAR, resolve_backend


@pytest.fixture
def feats(rng):
    return torch.randn(4, 8, generator=rng), torch.randn(6, 8, generator=rng)


@pytest.mark.parametrize("op", ["energy", "ce"])
def test_bad_feature_tensors(feats, op):
    x, t = feats
    y = torch.tensor([0, 1, 2, 3])
    call = {"energy": lambda a, b: vlood_fast.energy_score(a, b),
            "ce": lambda a, b: vlood_fast.clip_cross_entropy(a, b, y)}[op]
    with pytest.raises(ValueError, match=r"image_features must have shape \[B, D\]"):
        call(x[0], t)
    with pytest.raises(ValueError, match=r"text_features must have shape \[K, D\]"):
        call(x, t[None])
    with pytest.raises(ValueError, match="feature dim 8 but text_features has 5"):
        call(x, t[:, :5])
    with pytest.raises(TypeError, match="text_features has dtype torch.float16"):
        call(x, t.half())
    with pytest.raises(ValueError, match="text_features is on meta"):
        call(x, t.to("meta"))
    with pytest.raises(TypeError, match="image_features must be float32"):
        call(x.long(), t)
    with pytest.raises(TypeError, match="image_features must be a torch.Tensor"):
        call(x.numpy(), t)
    with pytest.raises(ValueError, match="image_features must be non-empty"):
        call(x[:0], t)
    with pytest.raises(ValueError, match="text_features must be non-empty"):
        call(x, t[:0])


def test_bad_labels(feats):
    x, t = feats
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\).*\[0, 6\]"):
        vlood_fast.clip_cross_entropy(x, t, torch.tensor([0, 1, 2, 6]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\)"):
        vlood_fast.clip_cross_entropy(x, t, torch.tensor([-1, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"labels must have shape \[4\]"):
        vlood_fast.clip_cross_entropy(x, t, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        vlood_fast.clip_cross_entropy(x, t, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match="labels must be an integer torch.Tensor"):
        vlood_fast.clip_cross_entropy(x, t, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="reduction must be one of"):
        vlood_fast.clip_cross_entropy(x, t, torch.tensor([0, 1, 2, 3]), reduction="avg")


def test_bad_scalars(feats):
    x, t = feats
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        vlood_fast.energy_score(x, t, temperature=0.0)
    with pytest.raises(ValueError, match="logit_scale must be a positive finite number"):
        vlood_fast.energy_score(x, t, logit_scale=float("inf"))
    with pytest.raises(TypeError, match="logit_scale must be a plain number"):
        vlood_fast.energy_score(x, t, logit_scale=torch.tensor(100.0, requires_grad=True))
    with pytest.raises(TypeError, match="logit_scale must be a positive number"):
        vlood_fast.energy_score(x, t, logit_scale="100")
    # a 0-d tensor without grad is accepted as a number
    assert torch.allclose(vlood_fast.energy_score(x, t, logit_scale=torch.tensor(3.0)),
                          vlood_fast.energy_score(x, t, logit_scale=3.0))


def test_dispatch_defaults_and_overrides(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend(cpu, torch.float32) == "torch"
    assert resolve_backend(cuda, torch.float32) == "triton"
    assert resolve_backend(cuda, torch.float64) == "torch"  # kernels accumulate in fp32
    monkeypatch.setenv(ENV_VAR, "reference")
    assert resolve_backend(cuda, torch.float32) == "reference"
    assert resolve_backend(cpu, torch.float32, backend="torch") == "torch"  # argument wins
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="VLOOD_FAST_BACKEND must be one of"):
        resolve_backend(cpu, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend(cpu, torch.float32, backend="numpy")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch, feats):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        vlood_fast.energy_score(*feats, backend="triton")


def test_env_override_selects_the_implementation(monkeypatch, feats):
    from vlood_fast.reference import energy as reference
    calls = []
    real = reference.energy_score
    monkeypatch.setattr(reference, "energy_score", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv(ENV_VAR, "reference")
    via_reference = vlood_fast.energy_score(*feats)
    assert calls == [1]
    monkeypatch.setenv(ENV_VAR, "torch")
    via_torch = vlood_fast.energy_score(*feats)
    assert calls == [1]
    assert torch.allclose(via_reference, via_torch, rtol=1e-5)
