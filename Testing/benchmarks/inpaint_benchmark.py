"""Inpainting benchmark: train on some volumes, evaluate on held-out ones, time training and export.

Prints (markdown): hidden-region / whole-image PSNR and SSIM of the model, mean fill and
biharmonic inpainting for each corruptor (3 seeds, mean ± sd), training throughput and the time
to export the features of a 320x320x22 clinical stack.

Usage (from the repository root)::

    .venv/bin/python Testing/benchmarks/inpaint_benchmark.py --out bench-results/inpaint
    .venv/bin/python Testing/benchmarks/inpaint_benchmark.py --checkpoint bench-results/inpaint/model.pt

Held out (never trained on, never used for validation): atlas GA22_notoperated, GA25_operated,
GA28_operated and clinical stack sub-01_run-5. The other 9 volumes are split by
FetalInpaintLib into training and validation volumes.
"""

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "FetalInpaint"))

from FetalInpaintLib.evaluation import evaluate_inpainting, format_table, held_out_patches  # noqa: E402
from FetalInpaintLib.features import encode_volume  # noqa: E402
from FetalInpaintLib.train import add_architecture_options, architecture_options, read_volume  # noqa: E402
from FetalInpaintLib.training import TrainConfig, load_checkpoint, train  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
HELD_OUT = {"fetal_SB_atlas_GA22_notoperated", "fetal_SB_atlas_GA25_operated", "fetal_SB_atlas_GA28_operated", "sub-01_run-5"}


def mri_cases():
    with open(DATA / "cases.csv", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["dataset"].startswith("fetal_mri")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "inpaint"))
    parser.add_argument("--checkpoint", help="evaluate this model.pt instead of training")
    parser.add_argument("--corruptor", default="shapes")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--patches-per-epoch", type=int, default=2048)
    parser.add_argument("--base-channels", type=int, default=TrainConfig.base_channels)
    parser.add_argument("--depth", type=int, default=TrainConfig.depth)
    parser.add_argument("--patch-size", type=int, default=TrainConfig.patch_size)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    add_architecture_options(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out (same settings)")
    parser.add_argument("--patience", type=int, default=4,
                        help="stop after this many epochs without a better validation loss (0: never)")
    parser.add_argument("--max-patches", type=int, default=300, help="held-out patches evaluated per seed")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    cases = mri_cases()
    volumes = {row["case"]: read_volume(DATA / row["image"]) for row in cases}
    train_volumes = {k: v for k, v in volumes.items() if k not in HELD_OUT}
    held_out = [v for k, v in volumes.items() if k in HELD_OUT]
    print(f"load: {os.getloadavg()}  threads: {torch.get_num_threads()}")

    if args.checkpoint:
        model, metadata = load_checkpoint(args.checkpoint)
        speed = metadata.get("patches_per_s")
    else:
        config = TrainConfig(corruptor=args.corruptor, epochs=args.epochs, patches_per_epoch=args.patches_per_epoch,
                             base_channels=args.base_channels, depth=args.depth, patch_size=args.patch_size,
                             batch_size=args.batch_size, **architecture_options(args),
                             patience=args.patience, device="auto")
        started = time.perf_counter()
        result = train(train_volumes, config, args.out, resume=args.resume,
                       progress=lambda info: print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                               for k, v in info.items()}), flush=True))
        print(f"training: {time.perf_counter() - started:.0f} s wall, {result.steps} steps, "
              f"{result.patches_per_s:.1f} patches/s, best val loss {result.best_val_loss:.5f}")
        model, metadata = load_checkpoint(result.checkpoint_path)
        speed = result.patches_per_s
    print(f"model: {metadata['architecture']} patch {metadata['patch_size']} split {metadata['split']['hash']} "
          f"trained with {metadata['corruptor']}")

    patches = held_out_patches(held_out, metadata["patch_size"], max_patches=args.max_patches)
    started = time.perf_counter()
    rows = evaluate_inpainting(model, patches, corruptors=("shapes", "holes", "toss"), strength=0.2, seeds=(0, 1, 2))
    print(f"\nHeld-out inpainting, {len(patches)} patches of {metadata['patch_size']} px, 20 % hidden, "
          f"data range 1.0 (percentile-normalised), 3 seeds ({time.perf_counter() - started:.0f} s):\n")
    print(format_table(rows))
    by = {(r["corruptor"], r["method"]): r["psnr_hidden"][0] for r in rows}
    for name in ("shapes", "holes", "toss"):
        print(f"{name}: model - biharmonic = {by[(name, 'model')] - by[(name, 'biharmonic')]:+.2f} dB (hidden region)")

    stack, spacing = volumes["sub-01_run-5"]
    encode_volume(model, stack[:2], spacing, metadata)  # warm-up (oneDNN kernel selection)
    timings = {}
    for pca in (None, 8):
        started, cpu_started = time.perf_counter(), time.process_time()
        features = encode_volume(model, stack, spacing, metadata, pca_components=pca)
        timings[pca] = time.perf_counter() - started
        # CPU seconds / threads = the wall time this would take on otherwise idle cores.
        cpu = (time.process_time() - cpu_started) / torch.get_num_threads()
        print(f"export {stack.shape} -> {features.shape}: {timings[pca]:.2f} s wall, "
              f"{cpu:.2f} s CPU per thread (pca={pca}), load {os.getloadavg()[0]:.1f}")
    print(f"training throughput: {speed:.1f} patches/s; load {os.getloadavg()}")
    with open(Path(args.out) / "benchmark.json", "w") if Path(args.out).exists() else open(os.devnull, "w") as handle:
        json.dump({"rows": rows, "patches_per_s": speed, "export_s": {str(k): v for k, v in timings.items()}}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
