"""End-to-end costs that no kernel fixes: encoder passes repeated by the papers' code.

    .venv/bin/python -m pytest benchmarks/bench_pipeline.py

- OGEN: one training step as OGEN's code runs it (image encoder every step, separate base and
  new text forwards, and a second full forward after the warm-up) vs vlood_fast's step
  (cached image features, one text forward for base + new classes). Small random open_clip
  model ('vlood-small', 64 px images), 20 base + 20 new classes, batch 32.
"""
import torch

from common import record
from vlood_fast.clip import SMALL_MODEL, PromptLearner, create_model
from vlood_fast.ogen import ClassStatistics, OgenGenerator, OgenLoss
from vlood_fast.reference.ogen_step import paper_ogen_step, vlood_ogen_step

import pytest

NUM_BASE, NUM_NEW, BATCH = 20, 20, 32


@pytest.fixture(scope="module")
def ogen_setup():
    torch.manual_seed(0)
    model, _, tokenizer = create_model(SMALL_MODEL)
    names = [f"class number {i}" for i in range(NUM_BASE + NUM_NEW)]
    images = torch.randn(BATCH, 3, 64, 64)
    labels = torch.randint(0, NUM_BASE, (BATCH,))
    with torch.no_grad():
        feats = torch.nn.functional.normalize(model.encode_image(images).float(), dim=-1)
    dim = feats.shape[1]
    stats = ClassStatistics(NUM_BASE, dim).update(
        torch.nn.functional.normalize(torch.randn(4 * NUM_BASE, dim), dim=1),
        torch.arange(NUM_BASE).repeat(4))
    return dict(model=model, tokenizer=tokenizer, names=names, images=images, labels=labels,
                feats=feats, stats=stats, dim=dim)


@pytest.mark.parametrize("provider", ["reference", "torch"])
def test_ogen_step(benchmark, ogen_setup, provider):
    s = ogen_setup
    torch.manual_seed(1)
    generator = OgenGenerator(s["dim"])
    criterion = OgenLoss(generator, s["stats"].mean, s["stats"].std, warmup=0.2)
    if provider == "reference":
        base = PromptLearner(s["model"], s["tokenizer"], s["names"][:NUM_BASE])
        new = PromptLearner(s["model"], s["tokenizer"], s["names"][NUM_BASE:])
        new.ctx = base.ctx  # one set of context vectors, as in OGEN's prompt learner
        opt = torch.optim.SGD([base.ctx, *generator.parameters()], lr=0.002, momentum=0.9)

        def step():
            paper_ogen_step(s["model"], s["images"], s["labels"], base, new, criterion, opt)
        passes = dict(image_encoder_passes=2, text_forwards=4)
    else:
        learner = PromptLearner(s["model"], s["tokenizer"], s["names"])
        opt = torch.optim.SGD([learner.ctx, *generator.parameters()], lr=0.002, momentum=0.9)

        def step():
            vlood_ogen_step(s["feats"], s["labels"], learner, NUM_BASE, criterion, opt)
        passes = dict(image_encoder_passes=0, text_forwards=1)
    record(benchmark, group="ogen training step (after warm-up)", provider=provider, mode="step",
           op="ogen_step", shape=(BATCH, NUM_BASE + NUM_NEW, s["dim"]), **passes)
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
