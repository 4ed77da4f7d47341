"""torch.compile(fullgraph=True) of a module using the public ops: the custom ops of
vlood_fast/ops/library.py trace without graph breaks and match eager outputs and gradients."""
import pytest
import torch
import torch.nn.functional as F

import vlood_fast


class TinyCroftHead(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.adapter = vlood_fast.CroftAdapter(dim)

    def forward(self, x, t, y):
        u = F.normalize(x @ self.adapter.image_weight.t(), dim=1)
        ce = vlood_fast.clip_cross_entropy(u, t, y)
        energy = vlood_fast.energy_score(u, t, temperature=2.0).mean()
        edr = vlood_fast.edr_penalty(x, t, self.adapter.image_weight, self.adapter.text_weight)
        return ce + 0.1 * energy + edr


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_matches_eager(rng, backend):
    torch._dynamo.reset()
    B, K, D = 6, 9, 8
    x = F.normalize(torch.randn(B, D, generator=rng), dim=1)
    t = F.normalize(torch.randn(K, D, generator=rng), dim=1)
    y = torch.randint(0, K, (B,), generator=rng)
    head = TinyCroftHead(D)
    with torch.no_grad():
        head.adapter.image_weight.add_(0.1 * torch.randn(D, D, generator=rng))
    eager_loss = head(x, t, y)
    eager_grads = torch.autograd.grad(eager_loss, list(head.parameters()))
    compiled = torch.compile(head, fullgraph=True, backend=backend)
    loss = compiled(x, t, y)
    grads = torch.autograd.grad(loss, list(head.parameters()))
    assert torch.allclose(loss, eager_loss, rtol=1e-5)
    for a, b in zip(grads, eager_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_custom_ops_pass_opcheck(rng):
    x = torch.randn(5, 7, generator=rng, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 7, generator=rng, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 6, (5,), generator=rng)
    torch.library.opcheck(torch.ops.vlood_fast.similarity_lse, (x, t, y, 3.0, "torch"))
    torch.library.opcheck(torch.ops.vlood_fast.similarity_lse, (x, t, None, 3.0, "torch"))
    w = torch.eye(7, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.vlood_fast.edr_penalty, (x, t, w, w.detach().clone().requires_grad_(),
                                                             0.2, 0.5, 1.0, 1.0, 1 / 49, "torch"))
