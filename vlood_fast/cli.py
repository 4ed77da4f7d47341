"""The ``vlood-fast`` command line."""
import argparse
import sys


def _demo(args) -> int:
    from .demo import run_demo
    run_demo(seed=args.seed)
    return 0


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
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
