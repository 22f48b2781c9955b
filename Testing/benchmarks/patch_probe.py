"""Patch probe benchmark: fetal brain vs non-brain patches of the 3 clinical stacks.

Labels come from the expert brain masks (inside: >= 50 % of the patch in the mask; outside: no
mask pixel; up to 3 outside patches per inside patch). Classifiers are cross-validated leaving one
stack out. Feature sets: the trained encoder's latent features (patch encoded alone, and the
whole-slice "dense" map pooled over the patch, which is what FetalAnnotate receives), the same
encoder with random weights, FetalAnnotate's filter bank (pooled over the patch) and raw pixels.

Usage (from the repository root)::

    .venv/bin/python Testing/benchmarks/patch_probe.py --checkpoint bench-results/inpaint16/model.pt
"""

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "FetalInpaint"))
sys.path.insert(0, str(ROOT / "FetalAnnotate"))

from FetalInpaintLib.features import plot_embedding  # noqa: E402
from FetalInpaintLib.model import build_model  # noqa: E402
from FetalInpaintLib.probe import (  # noqa: E402
    cross_validate,
    dense_latent_features,
    labelled_patches,
    latent_features,
    raw_features,
    window_means,
)
from FetalInpaintLib.training import load_checkpoint  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def load_stacks():
    import SimpleITK as sitk

    with open(DATA / "cases.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["dataset"] == "fetal_mri_mialsrtk_sub01"]
    stacks = []
    for row in rows:
        image = sitk.ReadImage(str(DATA / row["image"]))
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / row["label"]))) > 0
        stacks.append((row["case"], sitk.GetArrayFromImage(image).astype(np.float32), mask, image.GetSpacing()[::-1]))
    return stacks


def filter_bank(volume, spacing):
    from FetalAnnotateLib.features import compute_features, feature_settings_for

    return compute_features(volume, spacing, feature_settings_for("default"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tsne", default=str(ROOT / "bench-results" / "probe_tsne.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    print(f"load: {os.getloadavg()}")

    model, metadata = load_checkpoint(args.checkpoint)
    torch.manual_seed(args.seed)
    random_model = build_model(metadata["architecture"]).eval()

    sets = {name: [] for name in ("latent (patch)", "latent (dense)", "random weights (patch)", "random weights (dense)",
                                  "filter bank", "raw pixels")}
    labels, groups = [], []
    for index, (case, volume, mask, spacing) in enumerate(load_stacks()):
        data = labelled_patches(volume, mask, spacing, args.patch_size, args.stride, seed=args.seed)
        p, pos = data["patches"], data["positions"]
        print(f"{case}: {int(data['labels'].sum())} brain / {int((data['labels'] == 0).sum())} other patches")
        sets["latent (patch)"].append(latent_features(model, p))
        sets["latent (dense)"].append(dense_latent_features(model, data["slices"], pos, args.patch_size))
        sets["random weights (patch)"].append(latent_features(random_model, p))
        sets["random weights (dense)"].append(dense_latent_features(random_model, data["slices"], pos, args.patch_size))
        sets["filter bank"].append(window_means(filter_bank(volume, spacing), data["axis"], pos, args.patch_size))
        sets["raw pixels"].append(raw_features(p))
        labels.append(data["labels"])
        groups.append(np.full(len(p), index))
    labels, groups = np.concatenate(labels), np.concatenate(groups)

    print(f"\n{len(labels)} patches of {args.patch_size} px ({labels.sum()} brain), leave-one-stack-out (3 folds)\n")
    print("| features | dims | RF balanced acc. | RF AUROC | linear balanced acc. | linear AUROC |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for name, parts in sets.items():
        features = np.concatenate(parts)
        cells = []
        for classifier in ("random_forest", "linear"):
            result = cross_validate(features, labels, groups, classifier, seed=args.seed)
            summary[(name, classifier)] = result["balanced_accuracy"][0]
            cells += [f"{100 * result['balanced_accuracy'][0]:.1f} ± {100 * result['balanced_accuracy'][1]:.1f}",
                      f"{result['auroc'][0]:.3f} ± {result['auroc'][1]:.3f}"]
        print(f"| {name} | {features.shape[1]} | " + " | ".join(cells) + " |", flush=True)

    for classifier in ("random_forest", "linear"):
        best = max(summary[(n, classifier)] for n in ("latent (patch)", "latent (dense)"))
        others = {n: summary[(n, classifier)] for n in ("random weights (patch)", "random weights (dense)", "filter bank")}
        print(f"{classifier}: best latent {100 * best:.1f} %, margin over random weights / filter bank: "
              + ", ".join(f"{n} {100 * (best - v):+.1f}" for n, v in others.items()))

    Path(args.tsne).parent.mkdir(parents=True, exist_ok=True)
    plot_embedding(np.concatenate(sets["latent (dense)"]), labels, args.tsne, label_names=("non-brain", "brain"),
                   title="t-SNE of latent (dense) patch features, 3 clinical stacks")
    print(f"t-SNE plot: {args.tsne}; load {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
