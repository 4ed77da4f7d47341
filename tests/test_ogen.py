"""OGEN method pieces: generator module, class statistics, OgenLoss, LocalMeanTeacher, a short run."""
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vlood_fast
from vlood_fast import ClassStatistics, LocalMeanTeacher, OgenGenerator, OgenLoss
from vlood_fast.reference import ogen as reference


def _randomize(module, rng, scale=None):
    with torch.no_grad():
        for p in module.parameters():
            s = scale if scale is not None else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=rng, dtype=p.dtype) * s)
    return module


# ---------------------------------------------------------------- generator
def test_generator_is_mha_plus_ffn_and_loads_both_ways(rng):
    D, H = 40, 4
    gen = _randomize(OgenGenerator(D, H, dropout=0.1), rng).eval()
    assert sorted(n for n, _ in gen.named_parameters()) == sorted([
        "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
        "ffn.0.weight", "ffn.0.bias", "ffn.2.weight", "ffn.2.bias"])
    mha = nn.MultiheadAttention(D, H, dropout=0.1, batch_first=True).eval()
    ffn = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D))
    mha.load_state_dict(gen.attn.state_dict())
    ffn.load_state_dict(gen.ffn.state_dict())
    q, k = torch.randn(5, 2, D, generator=rng), torch.randn(5, 3, D, generator=rng)
    v = torch.randn(5, 3, D, generator=rng)
    want = F.normalize(ffn(q) + mha(q, k, v)[0], dim=-1)
    assert torch.allclose(gen(q, k, v), want, atol=1e-6)
    other = OgenGenerator(D, H)
    other.attn.load_state_dict(_randomize(mha, rng).state_dict())
    other.ffn.load_state_dict(ffn.state_dict())
    gen.load_state_dict(other.state_dict())
    assert torch.equal(gen.attn.in_proj_weight, mha.in_proj_weight)


def test_generator_converts_ogen_checkpoint_names(rng):
    D = 16
    src = _randomize(OgenGenerator(D, 4), rng)
    sd = {"prompt_learner.ctx": torch.randn(4, D, generator=rng)}
    sd.update({"prompt_learner.multihead_attn." + n: t for n, t in src.attn.state_dict().items()})
    sd.update({"prompt_learner.ffn.layers.0." + n: t for n, t in src.ffn[0].state_dict().items()})
    sd.update({"prompt_learner.ffn.layers.1." + n: t for n, t in src.ffn[2].state_dict().items()})
    gen = OgenGenerator(D, 4)
    gen.load_state_dict(OgenGenerator.convert_reference_state_dict(sd))
    assert all(torch.equal(a, b) for a, b in zip(gen.state_dict().values(), src.state_dict().values()))


def test_generator_rejects_bad_arguments(rng):
    with pytest.raises(ValueError, match="num_heads"):
        OgenGenerator(30, 4)
    with pytest.raises(ValueError, match="dropout"):
        OgenGenerator(32, 4, dropout=1.0)
    gen = OgenGenerator(8, 2)
    q = torch.randn(3, 1, 8, generator=rng)
    with pytest.raises(ValueError, match="keys must have shape"):
        gen(q, torch.randn(3, 2, 9, generator=rng), torch.randn(3, 2, 8, generator=rng))
    with pytest.raises(ValueError, match="keys and values"):
        gen(q, torch.randn(3, 2, 8, generator=rng), torch.randn(3, 4, 8, generator=rng))
    with pytest.raises(ValueError, match="query must have shape"):
        gen(torch.randn(3, 8, generator=rng), q, q)


# ---------------------------------------------------------------- class statistics
def test_class_statistics_stream_equals_two_pass(rng):
    C, D = 7, 12
    labels = torch.randint(0, C, (103,), generator=rng)
    labels[labels == 4] = 0            # class 4 never seen
    labels[labels == 5] = 1
    labels[17] = 5                     # class 5 seen once: std 0
    feats = torch.randn(103, D, generator=rng) * 3 + 1
    stats = ClassStatistics(C, D)
    for lo, hi in [(0, 1), (1, 41), (41, 48), (48, 103)]:
        stats.update(feats[lo:hi], labels[lo:hi])
    mean, std, count = reference.class_statistics(feats.double(), labels, C)
    assert torch.equal(stats.count, count)
    assert torch.allclose(stats.mean.double(), mean, rtol=1e-6, atol=1e-6)
    assert torch.allclose(stats.std.double(), std, rtol=1e-6, atol=1e-6)
    assert (stats.std[4] == 0).all() and (stats.std[5] == 0).all()
    # state_dict round-trip, then keep streaming
    again = ClassStatistics(C, D)
    again.load_state_dict(stats.state_dict())
    extra_f, extra_l = torch.randn(9, D, generator=rng), torch.randint(0, C, (9,), generator=rng)
    stats.update(extra_f, extra_l)
    again.update(extra_f, extra_l)
    assert torch.equal(again.running_m2, stats.running_m2)
    with pytest.raises(ValueError, match="labels must lie"):
        stats.update(feats[:3], torch.tensor([0, 1, C]))
    with pytest.raises(ValueError, match=r"\[B, 12\]"):
        stats.update(torch.randn(3, D + 1), labels[:3])


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_class_neighbours_exclude_self(rng, backend):
    means = torch.randn(40, 24, generator=rng)
    means[31] = means[3]                       # a duplicate: ties resolve to the lower index
    want = reference.class_neighbours(means.double(), 3)
    got = vlood_fast.class_neighbours(means, 3, backend=backend)
    assert torch.equal(got, want)
    assert got[3, 0] == 31 and got[31, 0] == 3
    assert not (got == torch.arange(40)[:, None]).any()


# ---------------------------------------------------------------- OgenLoss
def _setup(rng, K=6, Kn=5, D=16, B=10, dtype=torch.float64):
    gen = _randomize(OgenGenerator(D, 4), rng).to(dtype).eval()
    x = F.normalize(torch.randn(B, D, generator=rng, dtype=dtype), dim=1)
    y = torch.randint(0, K, (B,), generator=rng)
    W = F.normalize(torch.randn(K, D, generator=rng, dtype=dtype), dim=1).requires_grad_()
    Wn = F.normalize(torch.randn(Kn, D, generator=rng, dtype=dtype), dim=1).requires_grad_()
    mu = F.normalize(torch.randn(K, D, generator=rng, dtype=dtype), dim=1)
    sigma = torch.rand(K, D, generator=rng, dtype=dtype) * 0.1 + 0.01
    noise = torch.rand(D, generator=rng, dtype=dtype)
    return gen, x, y, W, Wn, mu, sigma, noise


def _literal_ogen_loss(gen, x, y, W, Wn, mu, sigma, noise, warm, joint, s=100.0, k=3):
    """DESIGN.md section 4 written out the way OGEN's trainer does it (logit matrices, F.*)."""
    D = x.shape[1]
    sim = mu @ mu.t()
    sim.fill_diagonal_(float("-inf"))
    nbr = sim.topk(k, dim=1).indices[y]
    virt = mu + noise * sigma
    w_y = W[y].detach()
    x_y = gen(w_y[:, None], W[nbr].detach(), virt[nbr])[:, 0]
    x_k = gen(W[nbr].detach(), w_y[:, None], x[:, None]).flatten(0, 1)
    loss = F.mse_loss(x_y, x) * D + F.mse_loss(x_k, virt[nbr].flatten(0, 1)) * D
    if warm:
        return loss
    new = (w_y @ Wn.t()).topk(k, dim=1).indices
    x_n = gen(Wn[new], w_y[:, None], x[:, None]).flatten(0, 1)
    new_text, new_labels = (torch.cat([W, Wn]), new.flatten() + W.shape[0]) if joint else (Wn, new.flatten())
    return (loss + F.cross_entropy(s * x_y @ W.t(), y) * 0.25
            + F.cross_entropy(s * x_k @ W.t(), nbr.flatten()) * 0.25 / k
            + F.cross_entropy(s * x_n @ new_text.t(), new_labels) * 0.5 / k
            + F.cross_entropy(s * x @ W.t(), y) * 0.25)


@pytest.mark.parametrize("joint", [False, True], ids=["separate", "joint"])
@pytest.mark.parametrize("progress", [0.1, 0.5], ids=["warmup", "main"])
def test_ogen_loss_matches_literal_formula(rng, progress, joint):
    gen, x, y, W, Wn, mu, sigma, noise = _setup(rng)
    crit = OgenLoss(gen, mu, sigma, joint=joint)
    total, parts = crit(x, y, W, Wn, progress=progress, noise=noise)
    warm = progress < 0.2
    want = _literal_ogen_loss(gen, x, y, W, Wn, mu, sigma, noise, warm, joint)
    assert torch.allclose(total, want, rtol=1e-10)
    assert set(parts) == ({"gen_forward", "gen_reverse", "total"} if warm else
                          {"gen_forward", "gen_reverse", "ce_forward", "ce_reverse", "ce_new", "ce_real", "total"})
    total.backward()
    gen_grads = [p.grad for p in gen.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in gen_grads)
    if warm:   # the generator trains alone: text features receive no gradient
        assert W.grad is None and Wn.grad is None
    else:
        assert W.grad.abs().sum() > 0 and Wn.grad.abs().sum() > 0


def test_ogen_loss_distillation_term(rng):
    gen, x, y, W, Wn, mu, sigma, noise = _setup(rng)
    Wt = F.normalize(W.detach() + 0.1 * torch.randn(W.shape, generator=rng, dtype=W.dtype), dim=1)
    Wnt = F.normalize(Wn.detach() + 0.1 * torch.randn(Wn.shape, generator=rng, dtype=W.dtype), dim=1)
    crit = OgenLoss(gen, mu, sigma, distill_weight=0.5, distill_temperature=2.0)
    plain, _ = crit(x, y, W, Wn, noise=noise)
    total, parts = crit(x, y, W, Wn, noise=noise, teacher_text_features=Wt, teacher_new_text_features=Wnt)
    real = vlood_fast.distillation_loss(100 * x @ W.t(), 100 * x @ Wt.t(), 2.0)
    assert parts["distill"] > real > 0
    assert torch.allclose(total, plain + 0.5 * parts["distill"], rtol=1e-10)


def test_ogen_loss_rejects_bad_inputs(rng):
    gen, x, y, W, Wn, mu, sigma, noise = _setup(rng)
    crit = OgenLoss(gen, mu, sigma)
    with pytest.raises(ValueError, match="text_features must have shape"):
        crit(x, y, W[:-1], Wn)
    with pytest.raises(ValueError, match="at least 3"):
        crit(x, y, W, Wn[:2])
    with pytest.raises(ValueError, match="labels must lie"):
        crit(x, y + 10, W, Wn)
    with pytest.raises(ValueError, match="noise"):
        crit(x, y, W, Wn, noise=noise[:-1])
    with pytest.raises(ValueError, match="class_mean and class_std"):
        OgenLoss(gen, mu, sigma[:, :-1])
    with pytest.raises(TypeError, match="OgenGenerator"):
        OgenLoss(nn.Linear(16, 16), mu, sigma)


# ---------------------------------------------------------------- teacher
def test_local_mean_teacher_window_and_weights():
    student = nn.Linear(3, 2)
    teacher = LocalMeanTeacher(student, m_min=2, m_max=4, momentum=0.5)
    assert [teacher.window_size(p) for p in (0.0, 0.5, 1.0, 2.0)] == [2, 3, 4, 4]
    history = []
    for step, progress in enumerate([0.0, 0.0, 0.5, 1.0, 1.0, 1.0]):
        with torch.no_grad():
            student.weight.fill_(float(step + 1))
            student.bias.fill_(-float(step + 1))
        history.append(float(step + 1))
        m = teacher.update(student, progress)
        window = history[-min(len(history), teacher.window_size(progress)):]
        assert m == len(window)
        w = [0.5 ** (len(window) - 1 - j) for j in range(len(window))]
        want = sum(a * b for a, b in zip(w, window)) / sum(w)
        assert torch.allclose(teacher.model.weight, torch.full((2, 3), want))
        assert torch.allclose(teacher.model.bias, torch.full((2,), -want))
    assert len(teacher.snapshots) == 4
    assert not any(p.requires_grad for p in teacher.parameters())


def test_local_mean_teacher_state_dict_round_trip(rng):
    student = _randomize(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), rng)
    teacher = LocalMeanTeacher(student, m_min=1, m_max=3, momentum=0.8, temperature=3.0)
    for i in range(4):
        _randomize(student, rng)
        teacher.update(student, i / 4)
    buffer = io.BytesIO()
    torch.save(teacher.state_dict(), buffer)
    buffer.seek(0)
    clone = LocalMeanTeacher(student)
    clone.load_state_dict(torch.load(buffer, weights_only=False))
    assert (clone.m_min, clone.m_max, clone.momentum, clone.temperature) == (1, 3, 0.8, 3.0)
    _randomize(student, rng)
    teacher.update(student, 0.9)
    clone.update(student, 0.9)
    for a, b in zip(teacher.state_dict().items(), clone.state_dict().items()):
        if isinstance(a[1], torch.Tensor):
            assert torch.equal(a[1], b[1]), a[0]


def test_distillation_loss(rng):
    s = torch.randn(6, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    T = 2.0
    p_t = F.softmax(t / T, dim=1)
    want = (p_t * (F.log_softmax(t / T, dim=1) - F.log_softmax(s / T, dim=1))).sum(1).mean() * T * T
    got = vlood_fast.distillation_loss(s, t, T)
    assert torch.allclose(got, want, rtol=1e-12)
    got.backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    assert vlood_fast.distillation_loss(t.detach(), t.detach()).abs() < 1e-12
    with pytest.raises(ValueError, match="one shape"):
        vlood_fast.distillation_loss(s, t[:, :4])
    with pytest.raises(ValueError, match="m_min"):
        LocalMeanTeacher(nn.Linear(2, 2), m_min=5, m_max=3)


# ---------------------------------------------------------------- a short joint run
class _Student(nn.Module):
    def __init__(self, base, new, D):
        super().__init__()
        self.gen = OgenGenerator(D, 4, dropout=0.1)
        self.base = nn.Parameter(base.clone())
        self.new = nn.Parameter(new.clone())

    def text(self):
        return F.normalize(self.base, dim=1), F.normalize(self.new, dim=1)


def test_joint_training_run_loss_falls_and_stays_finite(rng):
    torch.manual_seed(0)
    K, Kn, D, B, steps = 8, 6, 32, 24, 60
    centers = F.normalize(torch.randn(K + Kn, D, generator=rng), dim=1)

    def batch():
        y = torch.randint(0, K, (B,), generator=rng)
        return F.normalize(centers[y] + 0.3 * torch.randn(B, D, generator=rng), dim=1), y

    stats = ClassStatistics(K, D)
    for _ in range(10):
        stats.update(*batch())
    student = _Student(centers[:K] + 0.6 * torch.randn(K, D, generator=rng),
                       centers[K:] + 0.6 * torch.randn(Kn, D, generator=rng), D)
    teacher = LocalMeanTeacher(student, m_min=2, m_max=5)
    crit = OgenLoss(student.gen, stats.mean, stats.std, neighbours=stats.neighbours(3), joint=True)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        progress = step / steps
        x, y = batch()
        W, Wn = student.text()
        Wt, Wnt = teacher.model.text()
        total, parts = crit(x, y, W, Wn, progress=progress, teacher_text_features=Wt,
                            teacher_new_text_features=Wnt)
        opt.zero_grad()
        total.backward()
        opt.step()
        assert all(torch.isfinite(v).all() for v in parts.values())
        assert all(torch.isfinite(p).all() for p in student.parameters())
        losses.append(total.item())
        if step % 5 == 4:
            teacher.update(student, progress)
    warm = int(0.2 * steps)
    assert sum(losses[warm - 4:warm]) < sum(losses[:4])            # generator-only phase
    assert sum(losses[-6:]) < 0.8 * sum(losses[warm:warm + 6])     # joint phase
