"""Command line training, also launchable with torchrun (DistributedDataParallel).

Examples
--------
Single process::

    python -m FetalInpaintLib.train --volumes a.nii.gz b.nrrd --out runs/a --epochs 20

Two CPU processes (gloo) or one process per GPU (nccl)::

    python -m torch.distributed.run --nproc_per_node 2 -m FetalInpaintLib.train --manifest cases.csv --out runs/b
"""

import argparse
import csv
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import FetalInpaintError, InvalidVolumeError
from .model import PREFILLS
from .training import TrainConfig, train


def read_volume(path):
    """(array z,y,x float32, spacing z,y,x) of a NIfTI / NRRD / any SimpleITK-readable file."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InvalidVolumeError(f"volume file {path} not found.")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InvalidVolumeError(f"cannot read {path} as an image ({error}).") from error
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidVolumeError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components; use a scalar volume.")
    return sitk.GetArrayFromImage(image).astype("float32"), tuple(image.GetSpacing()[::-1])


def manifest_paths(manifest, dataset=None, column="image"):
    """Image paths listed in a CSV manifest (relative paths resolve against its folder)."""
    manifest = Path(manifest)
    with open(manifest, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if dataset is None or row.get("dataset") == dataset]
    if rows and column not in rows[0]:
        raise FetalInpaintError(f"manifest {manifest} has no {column!r} column.")
    return [manifest.parent / row[column] for row in rows]


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m FetalInpaintLib.train", description=__doc__.split("\n")[0])
    source = parser.add_argument_group("data")
    source.add_argument("--volumes", nargs="+", default=[], help="image files (NIfTI, NRRD, ...)")
    source.add_argument("--manifest", help="CSV with an 'image' column (e.g. cases.csv)")
    source.add_argument("--dataset", help="only manifest rows of this 'dataset'")
    parser.add_argument("--out", required=True, help="output folder (model.pt, model.json, loss_curve.png)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/resume.pt")
    defaults = TrainConfig()
    for name in ("corruptor", "device"):
        parser.add_argument(f"--{name.replace('_', '-')}", default=getattr(defaults, name))
    for name in ("strength", "lr", "weight_decay", "whole_image_weight", "val_fraction", "min_foreground"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    for name in ("epochs", "batch_size", "patch_size", "stride", "base_channels", "depth", "in_channels",
                 "patience", "seed", "max_val_patches", "log_every"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--patches-per-epoch", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    add_architecture_options(parser)
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile (needs a C++ compiler)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per process")
    return parser


def add_architecture_options(parser):
    """``--skip-connections`` / ``--no-skip-connections`` and ``--prefill``, defaulting to TrainConfig's;
    read them back with :func:`architecture_options`."""
    defaults = TrainConfig()
    parser.add_argument("--skip-connections", action=argparse.BooleanOptionalAction, default=defaults.skip_connections,
                        help="U-Net skip connections")
    parser.add_argument("--prefill", default=defaults.prefill or "none", choices=["none", *PREFILLS],
                        help="fill the holes before the network, which predicts a correction to the fill")


def architecture_options(args):
    """TrainConfig keyword arguments of the options added by :func:`add_architecture_options`."""
    return {"skip_connections": args.skip_connections, "prefill": False if args.prefill == "none" else args.prefill}


def main(argv=None):
    args = build_parser().parse_args(argv)
    paths = [Path(p) for p in args.volumes]
    if args.manifest:
        paths += manifest_paths(args.manifest, args.dataset)
    if not paths:
        raise SystemExit("error: no volume: give --volumes FILE ... or --manifest cases.csv")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        dist.init_process_group(backend=backend)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = args.threads or max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(threads)
    rank = dist.get_rank() if dist.is_initialized() else 0

    options = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    options.update(architecture_options(args))
    options["augment"] = not args.no_augment
    config = TrainConfig(**options)
    volumes = {str(path): read_volume(path) for path in paths}

    def report(info):
        if rank == 0:
            print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in info.items()}), flush=True)

    # SIGTERM (e.g. the Slicer module's Stop) checkpoints the run and exits cleanly; --resume continues.
    terminated = []
    signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(signum))
    try:
        result = train(volumes, config, args.out, progress=report, should_stop=lambda: bool(terminated),
                       resume=args.resume)
    except FetalInpaintError as error:
        raise SystemExit(f"error: {error}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"checkpoint": result.checkpoint_path, "epochs": result.epochs_completed, "steps": result.steps,
                          "best_val_loss": result.best_val_loss, "patches_per_s": round(result.patches_per_s, 2),
                          "stopped_early": result.stopped_early, "interrupted": result.interrupted}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
