"""The ``vlood-fast`` command line."""
import argparse
import sys


def _demo(args) -> int:
    from .demo import run_demo
    run_demo(seed=args.seed)
    return 0


def _kernels(args) -> int:
    from . import aot
    argv = [f"--target={t}" for t in args.target or ()] + ([f"--json={args.json}"] if args.json else [])
    return aot.run_in_clean_process(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlood-fast",
        description="Fast, memory-lean robust CLIP fine-tuning (CRoFT, OGEN) and OOD detection.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the built-in demo on generated CLIP-like features",
                          description="Generate a synthetic CLIP-like feature world and run "
                                      "vlood_fast's ops on it; prints a short report.")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(func=_demo)

    kernels = sub.add_parser(
        "kernels", help="compile every Triton kernel for sm_80/sm_90 (no GPU needed) and report",
        description="Compile every Triton kernel specialization ahead of time for sm_80 and "
                    "sm_90 without a GPU and print registers, spills, shared memory and "
                    "tensor-core use per kernel.")
    kernels.add_argument("--target", type=int, action="append", choices=(80, 90),
                         help="compute capability (repeatable; default: both)")
    kernels.add_argument("--json", help="also write the results to this JSON file")
    kernels.set_defaults(func=_kernels)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
