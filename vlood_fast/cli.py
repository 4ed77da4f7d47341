"""The ``vlood-fast`` command line: demo, extract, train croft|ogen, eval, kernels."""
import argparse
import json
import sys


def _demo(args) -> int:
    from .demo import run_demo
    result = run_demo(seed=args.seed, epochs=args.epochs)
    return 0 if all(result["checks"].values()) else 1


def _kernels(args) -> int:
    from . import aot
    argv = [f"--target={t}" for t in args.target or ()] + ([f"--json={args.json}"] if args.json else [])
    return aot.run_in_clean_process(argv)


def _encoder(args):
    from .pipeline import Encoder
    return Encoder.load(args.model, args.pretrained, args.cache, device=args.device,
                        progress=not args.quiet)


def _config(args):
    from .loop import TrainConfig
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       resume=args.resume, progress=not args.quiet)


def _extract(args) -> int:
    from .pipeline import extract
    encoder = _encoder(args)
    for root in args.data:
        feats, labels, classnames = extract(encoder, root, domains=args.domains)
        print(f"{root}: {feats.shape[0]} images, {len(classnames)} classes, dim {feats.shape[1]}")
    print(f"cache {args.cache}: {encoder.cache.stats()}")
    return 0


def _train(args) -> int:
    from . import pipeline
    encoder = _encoder(args)
    if args.method == "croft":
        result = pipeline.run_croft(encoder, args.train, out_dir=args.out, val_root=args.val,
                                    ood_root=args.ood, shots=args.shots, config=_config(args),
                                    domains=args.domains, wccf=not args.no_wccf, preset=args.preset)
    else:
        result = pipeline.run_ogen(encoder, args.train, out_dir=args.out, test_root=args.test,
                                   shots=args.shots, config=_config(args), domains=args.domains,
                                   joint=args.joint)
    print(json.dumps({"best_epoch": result.best_epoch, **{k: v for k, v in result.best.items()
                                                          if isinstance(v, (int, float))}}, indent=1))
    print(f"run saved to {args.out} (best.pt, last.pt, metrics.jsonl, run.json); "
          f"encoder passes this run: {encoder.cache.misses}")
    return 0


def _eval(args) -> int:
    from .pipeline import evaluate_run
    metrics = evaluate_run(args.run, args.data, ood_root=args.ood, cache_dir=args.cache,
                           progress=not args.quiet)
    print(json.dumps(metrics, indent=1))
    return 0


def _add_model_args(p):
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name (default: ViT-B-32)")
    p.add_argument("--pretrained", default=None,
                   help="None (random init), an open_clip tag, or a local weights file")
    p.add_argument("--cache", default=".vlood_cache", help="feature cache folder (default: .vlood_cache)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_train_args(p):
    p.add_argument("--train", required=True, help="training image folder (one folder per class)")
    p.add_argument("--out", required=True, help="run folder for checkpoints and metrics")
    p.add_argument("--shots", type=int, default=None, help="few-shot: images per class (default: all)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--domains", nargs="*", default=None,
                   help="domain folders to use (PACS/VLCS layout root/<domain>/<class>); 'all' for every one")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlood-fast",
        description="Fast, memory-lean robust CLIP fine-tuning (CRoFT, OGEN) and OOD detection.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train CRoFT and OGEN on a generated CLIP-like feature world",
                          description="Generate a synthetic CLIP-like feature world, train CRoFT and "
                                      "OGEN heads on it and compare them with zero-shot CLIP.")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--epochs", type=int, default=10, help="training epochs per method (default: 10)")
    demo.set_defaults(func=_demo)

    extract = sub.add_parser("extract", help="encode image folders into the feature cache",
                             description="Encode class-folder image sets with a frozen open_clip "
                                         "model into the feature cache (once per model/weights/files).")
    _add_model_args(extract)
    extract.add_argument("--data", nargs="+", required=True, help="image folder(s), one folder per class")
    extract.add_argument("--domains", nargs="*", default=None, help="domain folders (or 'all')")
    extract.set_defaults(func=_extract)

    train = sub.add_parser("train", help="train CRoFT or OGEN on an image folder",
                           description="Train CRoFT (adapters + shift generator on cached features) "
                                       "or OGEN (prompt learner + feature generator + teacher).")
    methods = train.add_subparsers(dest="method", required=True, metavar="METHOD")
    croft = methods.add_parser("croft", help="CRoFT: robust adapters with the EDR penalty",
                               description="Train CRoFT adapters on cached features.")
    _add_model_args(croft)
    _add_train_args(croft)
    croft.add_argument("--val", help="validation image folder (same classes): selects the best epoch")
    croft.add_argument("--ood", help="OOD image folder (unknown classes): AUROC / FPR95 per epoch")
    croft.add_argument("--preset", choices=("setup1", "setup2"), default="setup1",
                       help="EDR reductions: setup1 (ImageNet protocol) or setup2 (PACS/VLCS)")
    croft.add_argument("--no-wccf", action="store_true", help="switch off the shift generator")
    croft.set_defaults(func=_train)
    ogen = methods.add_parser("ogen", help="OGEN: prompt learning with unknown-class synthesis",
                              description="Train OGEN on the base classes (first half of the class "
                                          "folders) and score base and new classes.")
    _add_model_args(ogen)
    _add_train_args(ogen)
    ogen.add_argument("--test", help="test image folder with all classes: base/new/H accuracy")
    ogen.add_argument("--joint", action="store_true", help="score synthesized features against base+new")
    ogen.set_defaults(func=_train)

    evaluate = sub.add_parser("eval", help="evaluate a finished run on an image folder",
                              description="Load a run's best checkpoint and report accuracy "
                                          "(and OOD metrics for CRoFT runs with --ood).")
    evaluate.add_argument("--run", required=True, help="run folder written by 'vlood-fast train'")
    evaluate.add_argument("--data", required=True, help="image folder with the run's classes")
    evaluate.add_argument("--ood", help="OOD image folder")
    evaluate.add_argument("--cache", default=".vlood_cache")
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.set_defaults(func=_eval)

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
    try:
        return args.func(args)
    except (OSError, ValueError, TypeError) as exc:
        # user errors (missing paths, empty classes, unknown models): one clear line, exit 2
        print(f"vlood-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
