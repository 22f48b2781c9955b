"""Do FetalInpaint encoder features help FetalAnnotate? Robot-user Dice with and without them.

An inpainting autoencoder is pretrained, without labels, on the MRI stacks of one dataset (or a
given checkpoint is used); its bottleneck, upsampled to the voxel grid and reduced by PCA, is
passed to the engine as ``extra_features``. Both variants then meet the same robot user
(robot_user.py) for ``--rounds`` rounds; Dice at rounds 0 and 5 and seconds per round are printed
side by side. Pretraining on the very stacks that are segmented is what a user does with the
module (self-supervised, no expert mask is seen); ``--holdout`` trains one encoder per stack on
the other stacks instead. ``--seeds N`` repeats the robot rounds with the engine's forest at
random states 0..N-1 and reports the mean gain and the gain per random state.
``--random-weights`` replaces the encoder by the same architecture with random weights (seeded
by ``--seed``): the control that shows what pretraining adds over random convolutions.

    .venv/bin/python Testing/benchmarks/latent_channels_benchmark.py --epochs 6
    .venv/bin/python Testing/benchmarks/latent_channels_benchmark.py --checkpoint runs/x/model.pt

Not part of CI.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import robot_benchmark  # noqa: F401  (puts FetalAnnotate/ and this folder on sys.path)
import robot_user

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPOSITORY_ROOT / "FetalInpaint"))


def pretrain(volumes, epochs, patches_per_epoch, output_dir, seed):
    """Train an encoder on ``{name: (array, spacing)}``; return (model, metadata, seconds)."""
    from FetalInpaintLib.training import TrainConfig, load_checkpoint, train

    start = time.perf_counter()
    config = TrainConfig(epochs=epochs, patches_per_epoch=patches_per_epoch, seed=seed, device="auto", patience=0)
    result = train(volumes, config, output_dir)
    model, metadata = load_checkpoint(result.checkpoint_path)
    return model, metadata, time.perf_counter() - start


def robot_rounds(image, spacing, target, axis, rounds, extra_features=None, outline=False, random_state=0):
    """Dice per round and seconds per round of the engine with the robot user (``outline``: outline mode)."""
    from FetalAnnotateLib import OUTLINE_MARGIN_MM, AnnotationSession

    session = AnnotationSession(image, spacing, extra_features=extra_features, random_state=random_state,
                                enclosure_margin_mm=OUTLINE_MARGIN_MM if outline else None)
    strokes = robot_user.initial_strokes(target, axis)
    dices, seconds = [], []
    for round_index in range(rounds + 1):
        start = time.perf_counter()
        prediction = session.update(strokes).labels == robot_user.FOREGROUND
        seconds.append(time.perf_counter() - start)
        dices.append(robot_user.dice(prediction, target))
        if round_index < rounds and not robot_user.add_correction_stroke(strokes, target, prediction, axis):
            dices += [dices[-1]] * (rounds - round_index)
            break
    return dices, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", nargs="?", default=str(REPOSITORY_ROOT.parent / "shared" / "data" / "cases.csv"))
    parser.add_argument("--dataset", default="fetal_mri_mialsrtk_sub01")
    parser.add_argument("--checkpoint", default="", help="use this trained encoder instead of pretraining")
    parser.add_argument("--epochs", type=int, default=6, help="pretraining epochs (default: %(default)s)")
    parser.add_argument("--patches-per-epoch", type=int, default=4096,
                        help="random training patches per epoch (default: %(default)s)")
    parser.add_argument("--holdout", action="store_true", help="pretrain one encoder per case on the other cases")
    parser.add_argument("--pca", type=int, default=8, help="encoder channels kept after PCA (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--outline", action="store_true", help="run the engine in outline mode")
    parser.add_argument("--seed", type=int, default=0, help="pretraining seed")
    parser.add_argument("--seeds", type=int, default=1, help="random states 0..N-1 of the engine's forest")
    parser.add_argument("--random-weights", action="store_true",
                        help="use the encoder's architecture with random weights (the control for pretraining)")
    args = parser.parse_args(argv)

    import torch
    from FetalInpaintLib.features import encode_volume
    from FetalInpaintLib.model import build_model
    from FetalInpaintLib.training import load_checkpoint

    root = Path(args.manifest).parent
    rows = robot_benchmark.read_manifest(args.manifest, dataset=args.dataset)
    cases = {row["case"]: robot_benchmark.load_case(row, root) for row in rows}
    volumes = {name: (image, spacing) for name, (image, _, spacing, _) in cases.items()}

    encoders = {}
    with tempfile.TemporaryDirectory() as scratch:
        if args.checkpoint:
            model, metadata = load_checkpoint(args.checkpoint)
            encoders = {name: (model, metadata) for name in cases}
            print(f"encoder: {args.checkpoint}")
        elif args.holdout:
            for name in cases:
                others = {other: volume for other, volume in volumes.items() if other != name}
                model, metadata, seconds = pretrain(others, args.epochs, args.patches_per_epoch, Path(scratch) / name, args.seed)
                encoders[name] = (model, metadata)
                print(f"encoder for {name}: pretrained on {sorted(others)} in {seconds:.0f} s")
        else:
            model, metadata, seconds = pretrain(volumes, args.epochs, args.patches_per_epoch, Path(scratch) / "all", args.seed)
            encoders = {name: (model, metadata) for name in cases}
            print(f"encoder: pretrained on {sorted(volumes)} ({args.epochs} epochs) in {seconds:.0f} s")
    if args.random_weights:
        torch.manual_seed(args.seed)
        random_models = {}
        for name, (model, metadata) in encoders.items():
            if id(model) not in random_models:
                random_models[id(model)] = build_model(metadata["architecture"]).eval()
            encoders[name] = (random_models[id(model)], metadata)
        print(f"encoder weights replaced by random ones (torch seed {args.seed})")

    print(f"\n{'case':22s} {'seed':>4s} {'variant':16s} {'Dice r0':>8s} {'Dice r5':>8s} {'s/round':>8s} {'encode s':>9s}")
    table = {"filter bank": [], "+ encoder": []}  # one row of Dice per (case, seed)
    for name, (image, target, spacing, axis) in cases.items():
        model, metadata = encoders[name]
        start = time.perf_counter()
        latent = encode_volume(model, image, spacing, metadata, pca_components=args.pca)
        encode_s = time.perf_counter() - start
        for seed in range(args.seeds):
            for variant, extra in (("filter bank", None), ("+ encoder", latent)):
                dices, seconds = robot_rounds(image, spacing, target, axis, args.rounds, extra, args.outline, seed)
                table[variant].append(dices)
                print(f"{name:22s} {seed:4d} {variant:16s} {dices[0]:8.3f} {dices[min(5, args.rounds)]:8.3f} "
                      f"{np.median(seconds):8.2f} {encode_s if extra is not None else 0:9.2f}", flush=True)
    print()
    for variant, dices in table.items():
        dices = np.array(dices)
        print(f"MEAN {variant:16s} Dice r0 {dices[:, 0].mean():.3f}  r5 {dices[:, min(5, args.rounds)].mean():.3f}  "
              f"(n={len(dices)} case x seed runs)")
    gains = np.array([d[0] for d in table["+ encoder"]]) - np.array([d[0] for d in table["filter bank"]])
    per_seed = gains.reshape(len(cases), args.seeds).mean(axis=0)  # rows run case-major, seeds inner
    print(f"encoder channels change mean Dice at round 0 by {gains.mean():+.3f} "
          f"(per random state: {' '.join(f'{g:+.3f}' for g in per_seed)})")


if __name__ == "__main__":
    main()
