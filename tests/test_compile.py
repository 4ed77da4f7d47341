"""torch.compile(fullgraph=True) of modules using the public ops: each op traces to the custom
ops of vlood_fast/ops/library.py without graph breaks, matches eager outputs and gradients
(aot_eager and inductor, torch and triton implementations, non-contiguous inputs, changing
batch sizes and scalars), runs the value checks inside the compiled graph, and the custom ops
pass ``torch.library.opcheck``. Adding an op: one row in TERMS (and its cases in OPCHECK)."""
import pytest
import torch
import torch._functorch.config
import torch.nn.functional as F

import vlood_fast
from vlood_fast.ops import similarity_lse as lse_ops

B, K, D = 6, 9, 8

# One row per public op: (its term in the test module, the custom op it must trace to).
# A term gets the adapted features u, v, the raw x, t, labels y, the module and the implementation.
TERMS = {
    "clip_cross_entropy": (lambda u, v, x, t, y, m, impl: vlood_fast.clip_cross_entropy(u, v, y, backend=impl),
                           "similarity_lse"),
    "energy_score": (lambda u, v, x, t, y, m, impl:
                     vlood_fast.energy_score(u, v, temperature=m.temperature, backend=impl).mean(),
                     "similarity_lse"),
    "similarity_logsumexp": (lambda u, v, x, t, y, m, impl:
                             vlood_fast.similarity_logsumexp(u, v, 7.5, backend=impl).mean(), "similarity_lse"),
    "ood_score": (lambda u, v, x, t, y, m, impl: vlood_fast.ood_score(u, v, "energy", temperature=2.0).mean(),
                  "similarity_lse"),  # dispatches by device only
    "edr_penalty": (lambda u, v, x, t, y, m, impl:
                    vlood_fast.edr_penalty(x, t, m.adapter.image_weight, m.adapter.text_weight, backend=impl),
                    "edr_penalty"),
}


class Head(torch.nn.Module):
    """A CRoFT-style head: adapters, then every term of TERMS (or the chosen ones)."""

    def __init__(self, terms=tuple(TERMS), impl="torch"):
        super().__init__()
        self.adapter = vlood_fast.CroftAdapter(D)
        self.terms, self.impl, self.temperature = terms, impl, 1.0
        with torch.no_grad():  # away from identity, so the weight gradients are generic
            self.adapter.image_weight.add_(0.1 * torch.randn(D, D, generator=torch.Generator().manual_seed(0)))

    def forward(self, x, t, y):
        u, v = self.adapter.image(x), self.adapter.text(t)
        return torch.stack([TERMS[name][0](u, v, x, t, y, self, self.impl) for name in self.terms])


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """A clean dynamo per test; no AOTAutograd cache: its key ignores a custom op's autograd
    formula, so an edited library.py could replay a stale backward (inductor's own cache is kept)."""
    torch._dynamo.reset()
    with torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


def inputs(rng, batch=B, transposed=True):
    """Leaves x [batch, D], t [K, D], labels; transposed: as .t() of [D, *] leaves (column-major)."""
    if transposed:
        xl = F.normalize(torch.randn(batch, D, generator=rng), dim=1).t().contiguous().requires_grad_()
        tl = F.normalize(torch.randn(K, D, generator=rng), dim=1).t().contiguous().requires_grad_()
        x, t = xl.t(), tl.t()
    else:
        xl = x = F.normalize(torch.randn(batch, D, generator=rng), dim=1).requires_grad_()
        tl = t = F.normalize(torch.randn(K, D, generator=rng), dim=1).requires_grad_()
    return (xl, tl), (x, t), torch.randint(0, K, (batch,), generator=rng)


def terms_and_grads(head, fn, leaves, x, t, y):
    out = fn(x, t, y)
    weights = torch.linspace(0.5, 1.5, out.shape[0])  # every term reaches every gradient
    grads = torch.autograd.grad((out * weights).sum(), [*leaves, *head.parameters()])
    return out.detach(), grads


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_matches(compiled, eager):
    """DESIGN's fp32 bounds, max-norm relative: inductor fuses the fp32 glue (normalize,
    adapters) around the ops and reassociates its sums."""
    (out, grads), (ref, ref_grads) = compiled, eager
    for a, b in zip(out, ref):
        assert rel_err(a, b) <= 1e-5
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) <= 1e-4


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_matches_eager(rng, backend, impl):
    """Transposed inputs too: the backward ops' outputs keep the strides the fakes promise."""
    head = Head(impl=impl)
    leaves, (x, t), y = inputs(rng)
    eager = terms_and_grads(head, head, leaves, x, t, y)
    compiled = torch.compile(head, fullgraph=True, backend=backend)
    assert_matches(terms_and_grads(head, compiled, leaves, x, t, y), eager)


@pytest.mark.parametrize("name", list(TERMS))
def test_each_public_op_traces_to_its_custom_op(rng, name):
    seen = []

    def record(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    head = Head(terms=(name,))
    _, (x, t), y = inputs(rng)
    torch.compile(head, fullgraph=True, backend=record)(x, t, y)
    assert f"vlood_fast.{TERMS[name][1]}" in seen


def test_changing_batch_sizes_and_scalars_do_not_break_the_graph(rng):
    """A float that changes between calls reaches the checks as a symbolic float (and
    dynamic shapes follow a changed batch size): both must trace with fullgraph=True."""
    head = Head()
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    for batch, temperature in ((5, 1.0), (7, 0.5), (3, 0.3)):
        head.temperature = temperature
        leaves, (x, t), y = inputs(rng, batch, transposed=False)
        assert_matches(terms_and_grads(head, compiled, leaves, x, t, y),
                       terms_and_grads(head, head, leaves, x, t, y))


def test_value_checks_run_inside_the_compiled_graph(rng, monkeypatch):
    """Label range and the opt-in finite check read values: skipped while tracing, run by the
    custom ops when the graph runs, with the eager error messages."""
    _, (x, t), y = inputs(rng, transposed=False)
    x, t = x.detach(), t.detach()
    eye = torch.eye(D)
    ce = torch.compile(lambda a, b, labels: vlood_fast.clip_cross_entropy(a, b, labels), fullgraph=True,
                       backend="aot_eager")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\)"):
        ce(x, t, torch.full((B,), K))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\)"):
        ce(x, t, torch.full((B,), -1))
    energy = torch.compile(lambda a, b: vlood_fast.energy_score(a, b), fullgraph=True, backend="aot_eager")
    edr = torch.compile(lambda a, b, wi: vlood_fast.edr_penalty(a, b, wi, eye), fullgraph=True,
                        backend="aot_eager")
    bad = t.clone()
    bad[2, 3] = float("nan")
    inf_eye = eye.clone()
    inf_eye[1, 1] = float("inf")
    assert torch.isnan(energy(x, bad)).any()  # off by default: no check, no device sync
    monkeypatch.setenv("VLOOD_FAST_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match="text_features contains NaN or Inf"):
        energy(x, bad)
    with pytest.raises(ValueError, match="image_features contains NaN or Inf"):
        ce(bad[:B], t, y)
    with pytest.raises(ValueError, match="image_weight contains NaN or Inf"):
        edr(x, t, inf_eye)


def test_gradients_only_for_inputs_that_need_them(rng, monkeypatch):
    needs = []
    real = lse_ops._GRAD["torch"]
    monkeypatch.setitem(lse_ops._GRAD, "torch",
                        lambda *a: needs.append(a[7:9]) or real(*a))  # (need_x, need_t)
    _, (x, t), y = inputs(rng, transposed=False)
    t = t.detach()  # frozen text features: no B x K x D pass for their gradient
    head = Head(terms=("clip_cross_entropy", "edr_penalty"))
    compiled = torch.compile(lambda a, b: vlood_fast.clip_cross_entropy(a, b, y), fullgraph=True,
                             backend="aot_eager")
    (gx,) = torch.autograd.grad(compiled(x, t), x)
    assert needs == [(True, False)]
    torch.testing.assert_close(gx, torch.autograd.grad(vlood_fast.clip_cross_entropy(x, t, y), x)[0])
    # EDR with frozen features: weight gradients only, equal to eager
    edr = torch.compile(lambda wi, wt: vlood_fast.edr_penalty(x.detach(), t, wi, wt), fullgraph=True,
                        backend="aot_eager")
    weights = list(head.adapter.parameters())
    torch.testing.assert_close(torch.autograd.grad(edr(*weights), weights),
                               torch.autograd.grad(vlood_fast.edr_penalty(x.detach(), t, *weights), weights))


def test_double_backward_through_a_compiled_graph_raises(rng):
    """Second order is eager-only (documented): compiled, it fails loudly, never silently."""
    _, (x, t), y = inputs(rng, transposed=False)
    compiled = torch.compile(lambda a, b: vlood_fast.energy_score(a, b).sum(), fullgraph=True,
                             backend="aot_eager")
    with pytest.raises(RuntimeError):
        (gx,) = torch.autograd.grad(compiled(x, t), x, create_graph=True)
        gx.square().sum().backward()


# ---------------------------------------------------------------- opcheck, every custom op
def _layout(tensor, how):
    if how == "transposed":
        return tensor.t().contiguous().t()
    if how == "sliced":
        wide = torch.zeros(tensor.shape[0], tensor.shape[1] + 3, dtype=tensor.dtype)
        wide[:, 2:2 + tensor.shape[1]] = tensor
        return wide[:, 2:2 + tensor.shape[1]]
    return tensor


def _opcheck_cases(rng, impl, how):
    """(custom op, args) per op; gradient ops get inputs without grad (they have no autograd)."""
    x, t = (_layout(torch.randn(n, 7, generator=rng), how) for n in (5, 6))
    y = torch.randint(0, 6, (5,), generator=rng)
    lse = lse_ops._FORWARD[impl](x, t, 3.0)[0]
    g, h = torch.rand(5, generator=rng), -torch.rand(5, generator=rng)
    w = _layout(torch.eye(7) + 0.1 * torch.randn(7, 7, generator=rng), how)
    edr_args = (x, t, w, w.t(), 0.2, 0.5, 1.0, 1.0, 1 / 49, impl)
    _, G, row = torch.ops.vlood_fast.edr_penalty(*edr_args)
    leaf = lambda a: a.detach().requires_grad_()  # noqa: E731
    ops = torch.ops.vlood_fast
    return [
        (ops.similarity_lse, (leaf(x), leaf(t), y, 3.0, impl)),
        (ops.similarity_lse, (leaf(x), leaf(t), None, 3.0, impl)),
        (ops.similarity_lse_grad, (x, t, lse, g, h, y, 3.0, impl, True, True)),
        (ops.similarity_lse_grad, (x, t, lse, g, None, None, 3.0, impl, False, True)),
        (ops.edr_penalty, (leaf(x), leaf(t), leaf(w), leaf(w.t()), *edr_args[4:])),
        (ops.edr_penalty_backward, (torch.tensor(1.5), x, t, w, w.t(), G, row, *edr_args[4:],
                                    [True, False, True, True])),
    ]


@pytest.mark.parametrize("how", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_custom_ops_pass_opcheck(rng, impl, how):
    for op, args in _opcheck_cases(rng, impl, how):
        torch.library.opcheck(op, args)
