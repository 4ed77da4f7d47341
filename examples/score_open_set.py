"""Open-set detection with any CLIP model's features: energy score + AUROC / FPR95.

    python examples/score_open_set.py                     # tiny random open_clip model
    python examples/score_open_set.py --model ViT-B-32 --pretrained /path/to/weights.pt

Steps: encode the class names into text features, encode ID and OOD images, score each
image with ``-energy_score`` (higher = in-distribution) and compute the detection metrics.
With a random model the numbers are meaningless; the code path is the one you run on real
weights. Replace ``make_synthetic_image_folder`` with your own image folders.
"""
import argparse
import tempfile

import vlood_fast
from vlood_fast.clip import class_text_features, create_model, encode_images
from vlood_fast.data import ImageFolderDataset, make_synthetic_image_folder


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vlood-tiny")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--id-root", default=None, help="ID images, one folder per class")
    parser.add_argument("--ood-root", default=None, help="OOD images (any folder layout of classes)")
    args = parser.parse_args(argv)

    tmp = tempfile.mkdtemp()
    if args.id_root is None:  # generated stand-ins for your data
        args.id_root, args.ood_root = f"{tmp}/id", f"{tmp}/ood"
        make_synthetic_image_folder(args.id_root, ["cat", "dog", "fox", "owl"], per_class=6, seed=0)
        make_synthetic_image_folder(args.ood_root, ["rock", "wave"], per_class=6, seed=1)

    model, preprocess, tokenizer = create_model(args.model, args.pretrained)
    id_set = ImageFolderDataset(args.id_root, transform=preprocess)
    text = class_text_features(model, tokenizer, id_set.classnames)           # [K, D], normalized
    id_feats, _ = encode_images(model, id_set, progress=False)                # [N, D], normalized
    ood_feats, _ = encode_images(model, ImageFolderDataset(args.ood_root, transform=preprocess),
                                 progress=False)

    # higher = in-distribution; fused: the N x K logits are never materialized
    id_scores = -vlood_fast.energy_score(id_feats, text, logit_scale=100.0)
    ood_scores = -vlood_fast.energy_score(ood_feats, text, logit_scale=100.0)
    metrics = vlood_fast.ood_metrics(id_scores, ood_scores)
    print(f"{len(id_set)} ID / {len(ood_feats)} OOD images, {len(id_set.classnames)} classes")
    print(f"AUROC {metrics['auroc']:.4f}  FPR95 {metrics['fpr95']:.4f}  "
          f"AUPR-In {metrics['aupr_in']:.4f}  AUPR-Out {metrics['aupr_out']:.4f}")
    return metrics


if __name__ == "__main__":
    main()
