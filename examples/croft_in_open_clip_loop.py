"""Adding the CRoFT objective to an open_clip fine-tuning loop that used plain cross-entropy.

    python examples/croft_in_open_clip_loop.py

Before: a linear-probe style loop on frozen CLIP features,
    loss = F.cross_entropy(100 * img @ txt.T, labels)
After: CRoFT's adapters, WCCF shift generator and EDR penalty. The encoders stay frozen, so the
features are computed once (outside the loop) and every epoch reuses them. Lines marked
"CRoFT" are what changes.
"""
import torch

from vlood_fast import CroftAdapter, CroftLoss, ShiftGenerator, croft_ood_score, ood_metrics
from vlood_fast.clip import class_text_features, create_model, encode_images
from vlood_fast.data import ImageFolderDataset, make_synthetic_image_folder


def main(root="/tmp/vlood_croft_example", epochs=3):
    make_synthetic_image_folder(f"{root}/train", ["cat", "dog", "fox", "owl"], per_class=8, seed=0)
    make_synthetic_image_folder(f"{root}/ood", ["rock", "wave"], per_class=8, seed=1)
    model, preprocess, tokenizer = create_model("vlood-tiny")   # your model and weights here
    train = ImageFolderDataset(f"{root}/train", transform=preprocess)
    text = class_text_features(model, tokenizer, train.classnames)         # frozen, [K, D]
    feats, labels = encode_images(model, train, progress=False)            # frozen, [N, D]
    ood, _ = encode_images(model, ImageFolderDataset(f"{root}/ood", transform=preprocess), progress=False)

    dim = text.shape[1]
    adapter, generator = CroftAdapter(dim), ShiftGenerator(dim)                       # CRoFT
    criterion = CroftLoss(adapter, generator, preset="setup2", lambda1=1.0, lambda2=5.0)  # CRoFT
    opt = torch.optim.SGD(adapter.parameters(), lr=0.002, momentum=0.9, weight_decay=0.1)
    opt_gen = torch.optim.SGD(generator.parameters(), lr=0.002, momentum=0.9, weight_decay=0.1)  # CRoFT

    for epoch in range(epochs):
        for idx in torch.randperm(len(labels)).split(8):
            x, y = feats[idx], labels[idx]
            g_loss, _ = criterion.generator_step(x, y, text)        # CRoFT: WCCF step
            opt_gen.zero_grad()
            g_loss.backward()
            opt_gen.step()
            # was: loss = F.cross_entropy(100 * x @ text.T, y)
            loss, parts = criterion.main(x, y, text)                 # CRoFT: CE + shift + EDR
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            metrics = ood_metrics(croft_ood_score(adapter, feats, text), croft_ood_score(adapter, ood, text))
        print(f"epoch {epoch}: loss {loss.item():.3f} (ce {parts['ce'].item():.3f}, "
              f"edr {parts['edr'].item():.4f}); open-set AUROC {metrics['auroc']:.3f}")
    return metrics


if __name__ == "__main__":
    main()
