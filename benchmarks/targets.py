"""Interleaved ratio check for the issue targets, robust to a busy machine.

    .venv/bin/python benchmarks/targets.py [--repeats 5]

pytest-benchmark times one provider after the other; when other processes load the CPU the
two halves of a comparison can see different machines. Here the providers of each case run
alternately (reference, vlood_fast, reference, ...) and the ratio of medians is reported.
"""
import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import bench_croft_step  # noqa: E402,F401
import vlood_fast  # noqa: E402
from bench_edr import _inputs as edr_inputs  # noqa: E402
from bench_similarity_lse import _inputs as lse_inputs  # noqa: E402


def lse_case(op, shape):
    x, t, y = lse_inputs(*shape)

    def make(backend):
        def run():
            x.grad = t.grad = None
            out = (vlood_fast.energy_score(x, t, backend=backend).sum() if op == "energy"
                   else vlood_fast.clip_cross_entropy(x, t, y, backend=backend))
            out.backward()
        return run
    return make("reference"), make("torch")


def edr_case(shape, grads="croft"):
    inputs = edr_inputs(*shape, grads)

    def make(backend):
        def run():
            for a in inputs:
                a.grad = None
            vlood_fast.edr_penalty(*inputs, backend=backend).backward()
        return run
    return make("reference"), make("torch")


def croft_step_case():
    import torch.nn.functional as F
    from vlood_fast import CroftAdapter, CroftLoss, ShiftGenerator
    from vlood_fast.reference.croft_step import paper_croft_step, vlood_croft_step
    B, K, D = 32, 400, 512
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(B, D, generator=g), dim=1)
    text = F.normalize(torch.randn(K, D, generator=g), dim=1)
    labels = torch.randint(0, K, (B,), generator=g)

    def modules():
        a, gen = CroftAdapter(D), ShiftGenerator(D)
        return (a, gen, torch.optim.SGD(a.parameters(), lr=0.002, momentum=0.9, weight_decay=0.1),
                torch.optim.SGD(gen.parameters(), lr=0.002, momentum=0.9, weight_decay=0.1))
    ra, rg, roa, rog = modules()
    va, vg, voa, vog = modules()
    crit = CroftLoss(va, vg)
    return (lambda: paper_croft_step(feats, labels, text, ra, rg, roa, rog),
            lambda: vlood_croft_step(feats, labels, text, crit, voa, vog))


def synthesis_case(U):
    from bench_synthesis import make_step
    return make_step("reference", U, U), make_step("torch", U, U)


CASES = {
    "energy fwd+bwd 256x1000x512": lambda: lse_case("energy", (256, 1000, 512)),
    "cross-entropy fwd+bwd 256x1000x512": lambda: lse_case("cross_entropy", (256, 1000, 512)),
    "energy fwd+bwd 4096x21843x512": lambda: lse_case("energy", (4096, 21843, 512)),
    "cross-entropy fwd+bwd 4096x21843x512": lambda: lse_case("cross_entropy", (4096, 21843, 512)),
    "EDR fwd+bwd 64x400x512 (text frozen)": lambda: edr_case((64, 400, 512)),
    "EDR fwd+bwd 256x21843x512 (text frozen)": lambda: edr_case((256, 21843, 512)),
    "EDR fwd+bwd 64x400x512 (all grads)": lambda: edr_case((64, 400, 512), "all"),
    "EDR fwd+bwd 256x21843x512 (all grads)": lambda: edr_case((256, 21843, 512), "all"),
    "CRoFT training step B=32 K=400 D=512": croft_step_case,
    "OGEN synthesis fwd+bwd U=C=1000": lambda: synthesis_case(1000),
    "OGEN synthesis fwd+bwd U=C=21843": lambda: synthesis_case(21843),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    args = parser.parse_args(argv)
    print(f"{'case':<42}{'reference':>12}{'vlood_fast':>12}{'speedup':>9}")
    for name, build in CASES.items():
        if args.k not in name:
            continue
        ref, fast = build()
        ref(), fast()  # warm-up
        small = "21843" not in name  # the big cases: fewer repeats
        reps = args.repeats * (4 if small else 1)
        times = {"ref": [], "fast": []}
        for _ in range(reps):
            for key, fn in (("ref", ref), ("fast", fast)):
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
        r, f = statistics.median(times["ref"]), statistics.median(times["fast"])
        print(f"{name:<42}{r * 1e3:>10.1f}ms{f * 1e3:>10.1f}ms{r / f:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
