"""OGEN batched synthesis: torch path and Triton kernel (interpreter) against the reference.

The reference builds the U x C similarity matrix, takes a tie-resolved top-k, gathers and runs
the generator module; ground truth is that reference in fp64.
"""
import copy

import pytest
import torch
from torch.func import functional_call

import vlood_fast
from vlood_fast.kernels import synthesis as kernels
from vlood_fast.ops import synthesis as S
from vlood_fast.reference import ogen as reference

# (U, C, D, H, k): D never a power of two; the 4th and 5th project only the gathered rows
SHAPES = [(37, 50, 48, 4, 3), (20, 90, 40, 4, 5), (70, 30, 24, 2, 8), (5, 200, 36, 4, 3),
          (3, 40, 20, 4, 1)]
BACKENDS = ["torch", "triton"]


@pytest.fixture(params=["tables", "gathered"])
def small_chunks(request, monkeypatch):
    """Several query blocks and bank chunks on test shapes, and both backward modes: the
    projected [C, D] tables kept for the backward, or per-chunk projection of gathered rows."""
    monkeypatch.setattr(S, "CHUNK_ELEMENTS", 256)  # 16 x 16 similarity chunks
    monkeypatch.setattr(S, "SEARCH_ROWS", 16)
    if request.param == "gathered":
        monkeypatch.setattr(S, "BACKWARD_TABLE_BYTES", 0)


def _generator(rng, D, H, dropout=0.1):
    gen = vlood_fast.OgenGenerator(D, H, dropout)
    with torch.no_grad():
        for p in gen.parameters():
            p.copy_(torch.randn(p.shape, generator=rng, dtype=torch.float64) / D ** 0.5)
    return gen.double().eval()


def _inputs(rng, U, C, D, exclude):
    q, bk, bv = (torch.randn(n, D, generator=rng, dtype=torch.float64) for n in (U, C, C))
    ex = torch.randint(0, C, (U,), generator=rng) if exclude else None
    return q, bk, bv, ex


def _rel(a, b):
    """Relative Frobenius error; absolute where the truth vanishes (k = 1: the key gradient is
    exactly zero analytically, while the fp64 reference's softmax backward leaves ~1e-16)."""
    err, size = (a.double() - b.double()).norm().item(), b.double().norm().item()
    return err / size if size > 1e-12 else err


def _grads(gen, q, bk, bv, ex, k, backend, weights):
    leaves = [t.detach().clone().requires_grad_() for t in (q, bk, bv)]
    gen.zero_grad(set_to_none=True)
    feats, idx = gen.synthesize(*leaves, k, ex, backend=backend)
    (feats.double() * weights).sum().backward()
    return feats, idx, [t.grad for t in leaves] + [p.grad for p in gen.parameters()]


# ---------------------------------------------------------------- search
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exclude", [False, True], ids=["all", "exclude"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_topk_neighbours_match_reference(rng, small_chunks, shape, exclude, backend):
    U, C, D, H, k = shape
    q, bk, _, ex = _inputs(rng, U, C, D, exclude)
    want = reference.select_neighbours(q, bk, k, ex)
    got = vlood_fast.topk_neighbours(q.float(), bk.float(), k, ex, backend=backend)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    if ex is not None:
        assert not (got == ex[:, None]).any()


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_ties_go_to_the_lowest_index(rng, small_chunks, backend):
    # small integers: every dot product is exact, so duplicate rows tie exactly in every path
    D, H = 12, 4
    base = torch.randint(1, 4, (9, D), generator=rng).double() * torch.randint(0, 2, (9, D), generator=rng).mul(2).sub(1)
    perm = torch.randperm(27, generator=rng)
    bank_keys = base.repeat(3, 1)[perm]                 # every row three times, scattered
    bank_values = torch.randn(27, D, generator=rng, dtype=torch.float64)
    queries = torch.randint(-2, 3, (40, D), generator=rng).double()
    queries[0] = bank_keys[5]
    exclude = torch.randint(0, 27, (40,), generator=rng)
    sims = queries @ bank_keys.t()
    sims[torch.arange(40), exclude] = float("-inf")
    want = sims.sort(dim=1, descending=True, stable=True).indices[:, :4]  # stable: lower index first
    gen = _generator(rng, D, H)
    dtype = torch.float64 if backend != "triton" else torch.float32
    g = copy.deepcopy(gen).to(dtype)
    feats, idx = g.synthesize(queries.to(dtype), bank_keys.to(dtype), bank_values.to(dtype), 4,
                              exclude, backend=backend)
    assert torch.equal(idx, want)
    assert torch.isfinite(feats).all()


# ---------------------------------------------------------------- forward / backward, fp32 + fp64
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exclude", [False, True], ids=["all", "exclude"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_grads_fp32(rng, small_chunks, shape, exclude, backend):
    U, C, D, H, k = shape
    gen = _generator(rng, D, H)
    q, bk, bv, ex = _inputs(rng, U, C, D, exclude)
    weights = torch.randn(U, D, generator=rng, dtype=torch.float64)
    want, want_idx, want_grads = _grads(gen, q, bk, bv, ex, k, "reference", weights)
    gen32 = copy.deepcopy(gen).float()
    got, idx, grads = _grads(gen32, q.float(), bk.float(), bv.float(), ex, k, backend, weights)
    assert got.dtype == torch.float32 and got.shape == (U, D)
    assert torch.equal(idx, want_idx)
    assert _rel(got, want) <= 1e-5
    for g, w in zip(grads, want_grads):
        assert g.dtype == torch.float32 and _rel(g, w) <= 1e-4


def test_torch_path_fp64_is_exact_with_default_chunks(rng):
    U, C, D, H, k = 300, 260, 20, 4, 3     # several query chunks at the default sizes
    gen = _generator(rng, D, H)
    q, bk, bv, ex = _inputs(rng, U, C, D, True)
    weights = torch.randn(U, D, generator=rng, dtype=torch.float64)
    want, want_idx, want_grads = _grads(gen, q, bk, bv, ex, k, "reference", weights)
    got, idx, grads = _grads(gen, q, bk, bv, ex, k, "torch", weights)
    assert torch.equal(idx, want_idx) and _rel(got, want) <= 1e-12
    assert all(_rel(g, w) <= 1e-10 for g, w in zip(grads, want_grads))


def test_gradcheck_and_gradgradcheck_fp64(rng, small_chunks):
    U, C, D, H, k = 4, 7, 8, 2, 2
    gen = _generator(rng, D, H)
    q, bk, bv, ex = _inputs(rng, U, C, D, True)
    names = ["attn.in_proj_weight", "attn.out_proj.bias", "ffn.0.weight", "ffn.2.bias"]
    params = [dict(gen.named_parameters())[n].detach().clone() for n in names]

    def fn(backend):
        synth = _Synth(gen, k, ex, backend)
        return lambda q_, bk_, bv_, *ps: functional_call(
            synth, dict(zip(["g." + n for n in names], ps)), (q_, bk_, bv_))

    args = [t.clone().requires_grad_() for t in (q, bk, bv, *params)]
    for backend in ("reference", "torch"):
        assert torch.autograd.gradcheck(fn(backend), args)
    assert torch.autograd.gradgradcheck(fn("torch"), args[:3] + [args[3]])


class _Synth(torch.nn.Module):
    def __init__(self, gen, k, ex, backend):
        super().__init__()
        self.g, self.k, self.ex, self.backend = gen, k, ex, backend

    def forward(self, q, bk, bv):
        return self.g.synthesize(q, bk, bv, self.k, self.ex, backend=self.backend)[0]


# ---------------------------------------------------------------- low precision
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]], ids=str)
def test_low_precision_no_worse_than_reference(rng, small_chunks, shape, dtype, backend):
    U, C, D, H, k = shape
    gen_lp = _generator(rng, D, H).to(dtype)
    gen64 = copy.deepcopy(gen_lp).double()                 # the same rounded weights, in fp64
    q, bk, bv, ex = (t.to(dtype) if t is not None and t.is_floating_point() else t
                     for t in _inputs(rng, U, C, D, True))
    weights = torch.randn(U, D, generator=rng, dtype=torch.float64)
    truth, truth_idx, truth_grads = _grads(gen64, q.double(), bk.double(), bv.double(), ex, k,
                                           "reference", weights)
    ref, _, ref_grads = _grads(gen_lp, q, bk, bv, ex, k, "reference", weights)
    got, idx, grads = _grads(gen_lp, q, bk, bv, ex, k, backend, weights)
    assert got.dtype == dtype and torch.equal(idx, truth_idx)   # fp32-accumulated selection
    assert _rel(got, truth) <= _rel(ref, truth) + 1e-3
    for g, r, t in zip(grads, ref_grads, truth_grads):
        assert g.dtype == dtype and _rel(g, t) <= _rel(r, t) + 1e-2


# ---------------------------------------------------------------- dropout (train mode)
def test_dropout_torch_and_triton_draw_the_same_mask(rng):
    U, C, D, H, k = 20, 30, 24, 4, 3
    gen = _generator(rng, D, H, dropout=0.3).float().train()
    q, bk, bv, ex = (t.float() if t is not None and t.is_floating_point() else t
                     for t in _inputs(rng, U, C, D, True))
    out = []
    for backend in BACKENDS:
        torch.manual_seed(7)
        out.append(gen.synthesize(q, bk, bv, k, ex, backend=backend)[0])
    assert _rel(out[0], out[1]) <= 1e-5
    assert _rel(out[0], gen.eval().synthesize(q, bk, bv, k, ex)[0]) > 1e-3  # dropout was active


def test_dropout_statistics_match_reference(rng):
    U, C, D, H, k, draws = 6, 12, 16, 2, 3, 400
    gen = _generator(rng, D, H, dropout=0.5).train()
    q, bk, bv, ex = _inputs(rng, U, C, D, True)
    q_rep = q.repeat(draws, 1)
    ex_rep = ex.repeat(draws)
    torch.manual_seed(0)
    ours = gen.synthesize(q_rep, bk, bv, k, ex_rep, backend="torch")[0].view(draws, U, D)
    ref = gen.synthesize(q_rep, bk, bv, k, ex_rep, backend="reference")[0].view(draws, U, D)
    se = (ours.std(0) ** 2 / draws + ref.std(0) ** 2 / draws).sqrt()
    assert ((ours.mean(0) - ref.mean(0)).abs() <= 5 * se + 1e-6).all()
    spread_ours, spread_ref = ours.var(0).sum(), ref.var(0).sum()
    assert 0.8 < (spread_ours / spread_ref).item() < 1.25
    assert spread_ours > 1e-3


# ---------------------------------------------------------------- kernel hygiene
@pytest.mark.parametrize("mode", ["one_pass", "split"])
def test_kernel_writes_only_its_outputs(rng, mode):
    U, C, D, H, k = 20, 40, 24, 4, 3
    f = torch.float32

    def view_in(rows, cols, fill):
        buf = torch.full((rows + 5, cols + 9), fill, dtype=f)
        return buf, buf[2:2 + rows, 4:4 + cols]

    inputs = []
    for rows in (U, C, U, C, C):
        buf, v = view_in(rows, D, 5.0)
        v.copy_(torch.randn(rows, D, generator=rng))
        inputs.append(v)
    q, bk, qs, kp, vp = inputs
    exclude = torch.randint(0, C, (U,), generator=rng)
    idx_buf = torch.full((U * k + 11,), -7, dtype=torch.int64)
    p_buf = torch.full((U * k * H + 11,), 9.0, dtype=f)
    ctx_buf, ctx = view_in(U, D, 9.0)
    idx, p = idx_buf[5:5 + U * k].view(U, k), p_buf[5:5 + U * k * H].view(U, k, H)
    want_idx, want_p, want_ctx = kernels.synthesis(q.contiguous(), bk.contiguous(), qs.contiguous(),
                                                   kp.contiguous(), vp.contiguous(), k, H, exclude=exclude)
    if mode == "one_pass":
        kernels.synthesis(q, bk, qs, kp, vp, k, H, exclude=exclude, out=(idx, p, ctx))
    else:
        kernels.synthesis(q, bk, None, None, None, k, H, exclude=exclude, attend=False, out=(idx, None, None))
        rows = want_idx.reshape(-1)
        kg, vg = kp[rows], vp[rows]   # slot-indexed tables, as the gathered projection builds them
        kernels.synthesis(q, bk, qs, kg, vg, k, H, indices=idx, search=False, row_from_slot=True,
                          out=(idx, p, ctx))
    assert torch.equal(idx, want_idx)
    assert torch.allclose(p, want_p, rtol=1e-6, atol=1e-7)
    assert torch.allclose(ctx, want_ctx, rtol=1e-6, atol=1e-6)
    assert (idx_buf[:5] == -7).all() and (idx_buf[5 + U * k:] == -7).all()
    assert (p_buf[:5] == 9).all() and (p_buf[5 + U * k * H:] == 9).all()
    untouched = torch.ones_like(ctx_buf, dtype=torch.bool)
    untouched[2:2 + U, 4:4 + D] = False
    assert (ctx_buf[untouched] == 9).all()


def test_degenerate_inputs_stay_finite(rng):
    D, H, k = 16, 4, 3
    gen = _generator(rng, D, H).float()
    row = torch.randn(1, D, generator=rng)
    bank = row.repeat(10, 1)                     # every bank row identical
    q = torch.randn(6, D, generator=rng).requires_grad_()
    for backend in ["reference"] + BACKENDS:
        feats, idx = gen.synthesize(q, bank, bank, k, torch.zeros(6, dtype=torch.long), backend=backend)
        assert torch.equal(idx, torch.tensor([[1, 2, 3]] * 6))
        grad, = torch.autograd.grad(feats.sum(), q)
        assert torch.isfinite(feats).all() and torch.isfinite(grad).all()


# ---------------------------------------------------------------- validation
def test_bad_inputs_raise(rng):
    D, H = 8, 2
    gen = _generator(rng, D, H).float()
    q, bk, bv = (torch.randn(n, D, generator=rng) for n in (4, 5, 5))
    cases = [
        (dict(k=6), ValueError, "k=6 exceeds"),
        (dict(k=5, exclude=torch.zeros(4, dtype=torch.long)), ValueError, "excluded"),
        (dict(k=0), ValueError, "k must lie"),
        (dict(k=9), ValueError, "k must lie"),
        (dict(k=2.0), TypeError, "k must be an int"),
        (dict(queries=torch.randn(4, D + 1)), ValueError, "feature dim"),
        (dict(bank_values=torch.randn(5, D + 1)), ValueError, "bank_values"),
        (dict(bank_values=torch.randn(6, D)), ValueError, "bank_values"),
        (dict(queries=torch.randn(4, 2 * D), bank_keys=torch.randn(5, 2 * D),
              bank_values=torch.randn(5, 2 * D)), ValueError, "generator's dim"),
        (dict(exclude=torch.full((4,), 5)), ValueError, "exclude"),
        (dict(exclude=torch.zeros(3, dtype=torch.long)), ValueError, "exclude"),
        (dict(exclude=torch.zeros(4)), TypeError, "exclude"),
        (dict(bank_keys=torch.randn(5, D, dtype=torch.float64)), TypeError, "dtype"),
        (dict(queries=torch.randn(4, D, 1)), ValueError, "queries"),
        (dict(queries=[[1.0] * D]), TypeError, "queries"),
    ]
    for change, err, msg in cases:
        args = dict(queries=q, bank_keys=bk, bank_values=bv, k=3, exclude=None)
        args.update(change)
        with pytest.raises(err, match=msg):
            gen.synthesize(**args)
    with pytest.raises(TypeError, match="OgenGenerator"):
        S.synthesize(torch.nn.Linear(D, D), q, bk, bv)
    with pytest.raises(ValueError, match="k=6 exceeds"):
        vlood_fast.topk_neighbours(q, bk, 6)
