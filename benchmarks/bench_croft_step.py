"""One whole CRoFT training step at the paper's Setup-I shape.

    .venv/bin/python -m pytest benchmarks/bench_croft_step.py

B = 32 real images with WCCF (so the penalty sees N = 64 rows), K = 400 classes, D = 512:
one generator step, then the main step, forward + backward + SGD update. 'reference' runs the
paper's per-step work (``vlood_fast.reference.croft_step.paper_croft_step``: separate similarity
products, recomputations, double backward); 'torch' runs ``CroftLoss`` as ``train_croft`` does.
"""
import pytest
import torch
import torch.nn.functional as F

from common import record
from vlood_fast import CroftAdapter, CroftLoss, ShiftGenerator
from vlood_fast.reference.croft_step import paper_croft_step, vlood_croft_step

B, K, D = 32, 400, 512


@pytest.mark.parametrize("provider", ["reference", "torch"])
def test_croft_training_step(benchmark, provider):
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(B, D, generator=g), dim=1)
    text = F.normalize(torch.randn(K, D, generator=g), dim=1)
    labels = torch.randint(0, K, (B,), generator=g)
    adapter, generator = CroftAdapter(D), ShiftGenerator(D)
    opt_a = torch.optim.SGD(adapter.parameters(), lr=0.002, momentum=0.9, weight_decay=0.1)
    opt_g = torch.optim.SGD(generator.parameters(), lr=0.002, momentum=0.9, weight_decay=0.1)
    if provider == "reference":
        def step():
            paper_croft_step(feats, labels, text, adapter, generator, opt_a, opt_g)
    else:
        criterion = CroftLoss(adapter, generator, preset="setup1")

        def step():
            vlood_croft_step(feats, labels, text, criterion, opt_a, opt_g)
    record(benchmark, group=f"croft training step B={B} (N={2 * B}) K={K} D={D}", provider=provider,
           mode="step", op="croft_step", shape=(2 * B, K, D))
    benchmark.pedantic(step, rounds=15, warmup_rounds=2)
