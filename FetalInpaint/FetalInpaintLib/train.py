"""Command line training, also launchable with torchrun (DistributedDataParallel).

Examples
--------
Single process::

    python -m FetalInpaintLib.train --volumes a.nii.gz b.nrrd --out runs/a --epochs 20

Two CPU processes (gloo) or one process per GPU (nccl)::

    python -m torch.distributed.run --nproc_per_node 2 -m FetalInpaintLib.train --manifest cases.csv --out runs/b

The same options are ``python -m FetalInpaintLib train``. torch is imported only when a training
starts, so building the parser (``--help``) works without it.
"""

import argparse
import csv
import gzip
import json
import math
import os
import signal
import sys
import zlib
from pathlib import Path

from .config import CORRUPTOR_NAMES, EARLIER_TRAINING_FILE_NAMES, PREFILL_NAMES, TrainConfig
from .errors import FetalInpaintError, InvalidVolumeError


def check_volume_file(path):
    """Refuse a truncated or corrupt NIfTI file, which SimpleITK would read padded with zeros.

    As FetalAnnotate's reader does: a ``.nii.gz`` must hold a complete gzip stream (ended, CRC
    checked), and a NIfTI file at least the voxel bytes its header announces after its voxel
    offset. The NRRD and MetaImage readers refuse missing data themselves.

    Parameters
    ----------
    path : pathlib.Path
        An existing image file.

    Raises
    ------
    InvalidVolumeError
        The data is shorter than its header says, or its compressed stream is damaged.
    RuntimeError
        SimpleITK cannot read the header.
    """
    import SimpleITK as sitk

    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    component_bytes = sitk.Image([1, 1], reader.GetPixelID(), reader.GetNumberOfComponents()).GetSizeOfPixelComponent()
    # The stored size: ITK reads integers scaled by scl_slope / scl_inter (e.g. dcm2niix's Philips scans) as float.
    component_bytes = min(component_bytes, max(1, int(reader.GetMetaData("bitpix")) // 8))
    expected = int(float(reader.GetMetaData("vox_offset"))) + \
        math.prod(reader.GetSize()) * reader.GetNumberOfComponents() * component_bytes
    if name.endswith(".gz"):
        try:
            with gzip.open(path) as stream:
                available = sum(len(piece) for piece in iter(lambda: stream.read(1 << 24), b""))
        except EOFError as error:
            raise InvalidVolumeError(f"{path} is truncated: its compressed data ends early; copy it again from its "
                                     "source.") from error
        except (gzip.BadGzipFile, zlib.error) as error:
            raise InvalidVolumeError(f"{path} is corrupt ({error}); copy it again from its source.") from error
    else:
        available = path.stat().st_size
    if available < expected:
        raise InvalidVolumeError(f"{path} is truncated: it holds {available} of the {expected} bytes its header "
                                 "announces; copy it again from its source.")


def read_image(path):
    """Read a scalar 2D image or 3D volume file, refusing a missing, truncated or corrupt one.

    Parameters
    ----------
    path : str or Path
        NIfTI, NRRD, MetaImage, PNG or any other file SimpleITK reads.

    Returns
    -------
    SimpleITK.Image
        2D or 3D, one component per pixel.

    Raises
    ------
    InvalidVolumeError
        Missing, unreadable, truncated or corrupt file, several components, or not 2D or 3D.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InvalidVolumeError(f"volume file {path} not found.")
    try:
        check_volume_file(path)
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InvalidVolumeError(f"cannot read {path} as an image ({error}).") from error
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidVolumeError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components; use a scalar volume.")
    if image.GetDimension() not in (2, 3):
        raise InvalidVolumeError(f"{path} is a {image.GetDimension()}D image; use a 2D image or a 3D volume.")
    return image


def image_volume(image):
    """(array z,y,x float32, spacing z,y,x) of a 2D or 3D image; a 2D image is a volume of one 1 mm slice."""
    import SimpleITK as sitk

    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    return sitk.GetArrayFromImage(image).astype("float32"), tuple(image.GetSpacing()[::-1])


def read_volume(path):
    """(array z,y,x float32, spacing z,y,x) of an image file checked by :func:`read_image` (a 2D image: one slice)."""
    return image_volume(read_image(path))


def check_output_folder(output_dir, resume=False, overwrite=False):
    """Refuse to start a training that would replace an earlier one in ``output_dir`` unasked.

    Parameters
    ----------
    output_dir : str or Path
    resume : bool, default False
        Continue the earlier training: allowed where its ``resume.pt`` exists.
    overwrite : bool, default False
        Replace the earlier training.

    Raises
    ------
    FetalInpaintError
        The folder holds a model, resume point or history (:data:`EARLIER_TRAINING_FILE_NAMES`), and
        neither ``overwrite`` nor ``resume`` with a ``resume.pt`` is given.
    """
    found = [name for name in EARLIER_TRAINING_FILE_NAMES if (Path(output_dir) / name).exists()]
    if not found or overwrite or (resume and "resume.pt" in found):
        return
    if resume:
        raise FetalInpaintError(f"{output_dir} holds a training ({', '.join(found)}) without resume.pt, so --resume "
                                "cannot continue it: give --overwrite to replace it, or another --out.")
    raise FetalInpaintError(f"{output_dir} already holds a training ({', '.join(found)}): give --resume to continue "
                            "it, --overwrite to replace it, or another --out.")


def manifest_paths(manifest, dataset=None, column="image"):
    """Image paths listed in a CSV manifest (relative paths resolve against its folder)."""
    manifest = Path(manifest)
    with open(manifest, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if dataset is None or row.get("dataset") == dataset]
    if rows and column not in rows[0]:
        raise FetalInpaintError(f"manifest {manifest} has no {column!r} column.")
    return [manifest.parent / row[column] for row in rows]


# TrainConfig fields set from the command line: (option type, help). The default shown is TrainConfig's.
TRAIN_OPTIONS = {
    "corruptor": (str, "how patches are hidden: shapes (circles, triangles, squares), holes (squares) or toss "
                       "(each pixel with probability STRENGTH)"),
    "strength": (float, "fraction of each patch hidden, in (0, 1)"),
    "epochs": (int, "passes over the training patches"),
    "batch_size": (int, "patches per optimiser step (per process under torchrun)"),
    "lr": (float, "AdamW peak learning rate (cosine decay to 0)"),
    "weight_decay": (float, "AdamW weight decay"),
    "patch_size": (int, "side of the square training patches in voxels (a multiple of 2**DEPTH)"),
    "stride": (int, "step between patches on each slice"),
    "min_foreground": (float, "keep patches with at least this fraction of tissue"),
    "base_channels": (int, "channels of the first encoder level (doubled at each level)"),
    "depth": (int, "encoder levels (the features are 1/2**DEPTH of the slice size)"),
    "in_channels": (int, "2: image and hidden-pixel mask; 1: image only"),
    "whole_image_weight": (float, "weight of the whole-patch L2 added to the hidden-region L2"),
    "val_fraction": (float, "fraction of volumes held out for validation"),
    "patches_per_epoch": (int, "random subset of training patches per epoch (default: all)"),
    "max_val_patches": (int, "validation patches evaluated after each epoch"),
    "patience": (int, "stop after this many epochs without validation improvement (0: never)"),
    "seed": (int, "random seed (split, order, corruptions)"),
    "device": (str, "auto (CUDA when available), cpu, cuda or cuda:N"),
    "max_steps": (int, "stop after this many optimiser steps (quick runs)"),
    "log_every": (int, "optimiser steps between progress records"),
}


def add_train_arguments(parser):
    """Add the options of a training (data, output folder, every TrainConfig setting) to ``parser``.

    Parameters
    ----------
    parser : argparse.ArgumentParser
    """
    data = parser.add_argument_group("data")
    data.add_argument("--volumes", nargs="+", default=[], metavar="FILE",
                      help="training image files (NIfTI, NRRD or anything SimpleITK reads)")
    data.add_argument("--manifest", metavar="CSV", help="CSV file with an 'image' column of image paths (relative to it)")
    data.add_argument("--dataset", help="use only the manifest rows whose 'dataset' column has this value")
    parser.add_argument("--out", required=True, metavar="FOLDER",
                        help="output folder: model.pt, model.json, resume.pt, history.json, loss_curve.png")
    earlier = parser.add_mutually_exclusive_group()
    earlier.add_argument("--resume", action="store_true", help="continue the training saved in FOLDER/resume.pt")
    earlier.add_argument("--overwrite", action="store_true",
                         help="replace the training FOLDER holds (default: refuse to start where FOLDER holds "
                              "model.pt, resume.pt or history.json)")
    defaults = TrainConfig()
    settings = parser.add_argument_group("training settings")
    for name, (kind, text) in TRAIN_OPTIONS.items():
        default = getattr(defaults, name)
        choices = CORRUPTOR_NAMES if name == "corruptor" else None
        settings.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, choices=choices,
                              help=f"{text} (default: {'none' if default is None else default})")
    add_architecture_options(settings)
    settings.add_argument("--no-augment", action="store_true", help="no random flips and transposes of the patches")
    settings.add_argument("--compile", action="store_true", help="torch.compile the model (needs a C++ compiler)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per process (default: the cores divided by the processes on this computer)")


def build_parser():
    """The parser of ``python -m FetalInpaintLib.train``."""
    parser = argparse.ArgumentParser(prog="python -m FetalInpaintLib.train", description=__doc__.split("\n")[0])
    add_train_arguments(parser)
    parser.add_argument("--verbose", action="store_true", help="show the full traceback of an error")
    return parser


def add_architecture_options(parser):
    """``--skip-connections`` / ``--no-skip-connections`` and ``--prefill``, defaulting to TrainConfig's;
    read them back with :func:`architecture_options`."""
    defaults = TrainConfig()
    parser.add_argument("--skip-connections", action=argparse.BooleanOptionalAction, default=defaults.skip_connections,
                        help="U-Net skip connections")
    parser.add_argument("--prefill", default=defaults.prefill or "none", choices=["none", *PREFILL_NAMES],
                        help="fill the holes before the network, which predicts a correction to the fill "
                             f"(default: {defaults.prefill or 'none'})")


def architecture_options(args):
    """TrainConfig keyword arguments of the options added by :func:`add_architecture_options`."""
    return {"skip_connections": args.skip_connections, "prefill": False if args.prefill == "none" else args.prefill}


def strict_json(record):
    """One JSON line: floats rounded, NaN and infinities as null (strict JSON)."""
    from .training import finite_or_none

    return json.dumps({k: (finite_or_none(round(v, 5)) if isinstance(v, float) else v) for k, v in record.items()},
                      allow_nan=False)


def run_train(args):
    """Run a training from parsed arguments (see :func:`add_train_arguments`); returns the exit code 0.

    Progress records and the final summary are printed as JSON lines on standard output. A stop
    file in the output folder, and SIGTERM, stop the training after the current step with its
    resume point saved.

    Raises
    ------
    FetalInpaintError
        No volume, unreadable volume, bad settings, an earlier training in the output folder (without
        ``--resume`` or ``--overwrite``; see :func:`check_output_folder`), or a locked output folder.
    """
    # SIGTERM stops like the stop file: the run is checkpointed and --resume continues it. Caught from
    # the start, so a SIGTERM while the volumes load is not lost.
    terminated = []
    signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(signum))
    paths = [Path(p) for p in args.volumes]
    if args.manifest:
        paths += manifest_paths(args.manifest, args.dataset)
    if not paths:
        raise FetalInpaintError("no volume: give --volumes FILE ... or --manifest cases.csv.")
    options = {name: getattr(args, name) for name in TRAIN_OPTIONS}
    options.update(architecture_options(args))
    options.update(augment=not args.no_augment, compile=args.compile)
    config = TrainConfig(**options)
    config.validate()
    check_output_folder(args.out, args.resume, args.overwrite)
    volumes = {str(path): read_volume(path) for path in paths}

    import torch
    import torch.distributed as dist

    from .training import train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        dist.init_process_group(backend=backend)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local_world))
    rank = dist.get_rank() if dist.is_initialized() else 0

    def report(info):
        if rank == 0:
            print(strict_json(info), flush=True)

    try:
        result = train(volumes, config, args.out, progress=report, should_stop=lambda: bool(terminated),
                       resume=args.resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    report({"checkpoint": result.checkpoint_path, "epochs": result.epochs_completed, "steps": result.steps,
            "best_val_loss": result.best_val_loss, "patches_per_s": result.patches_per_s,
            "stopped_early": result.stopped_early, "interrupted": result.interrupted})
    return 0


def main(argv=None):
    """``python -m FetalInpaintLib.train``: exit code 0 success, 2 nothing done (failure or usage error),
    130 interrupted."""
    from .__main__ import run_command

    return run_command(run_train, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
