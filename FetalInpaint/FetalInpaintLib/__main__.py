"""Command line of FetalInpaintLib: train an inpainting model, evaluate it, export its features.

Examples
--------
::

    python -m FetalInpaintLib train --volumes a.nii.gz b.nrrd --out runs/a --epochs 20
    python -m FetalInpaintLib evaluate --model runs/a/model.pt --volumes held_out.nii.gz
    python -m FetalInpaintLib export --model runs/a/model.pt --volume a.nii.gz --output a_features.nrrd --pca 8

Exit codes, as those of ``fetalannotate``: 0 success, 2 nothing done (a usage error, or a failure whose
message says what to do; ``--verbose`` adds the traceback), 130 interrupted. Building the parser needs
no torch: it is imported when a command runs.
"""

import argparse
import json
import sys
import traceback

from .config import CORRUPTOR_NAMES
from .errors import FetalInpaintError
from .train import add_train_arguments, image_volume, read_image, read_volume, run_train

#: Exit codes (the same as ``fetalannotate``'s): a failed command has done nothing, like a usage
#: error, which argparse ends with 2.
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 2, 130


def run_evaluate(args):
    """PSNR / SSIM of a model next to mean fill and biharmonic inpainting, printed as a table or JSON."""
    from .evaluation import evaluate_inpainting, format_table, held_out_patches
    from .training import load_checkpoint

    model, metadata = load_checkpoint(args.model, device=args.device)
    patch_size = int(metadata["patch_size"])
    volumes = [read_volume(path) for path in args.volumes]
    patches = held_out_patches(volumes, patch_size, tuple(metadata["normalization"]["percentiles"]),
                               max_patches=args.max_patches)
    if len(patches) == 0:
        raise FetalInpaintError(
            f"the volumes give no {patch_size} x {patch_size} patch that is mostly tissue: evaluate on volumes with "
            "more anatomy in their slices."
        )
    strength = float(metadata["corruptor"]["strength"]) if args.strength is None else args.strength
    rows = evaluate_inpainting(model, patches, tuple(args.corruptors), strength, tuple(args.seeds), device=args.device)
    print(json.dumps(rows, indent=2, allow_nan=False) if args.json else format_table(rows))
    return EXIT_OK


def run_export(args):
    """Encoder features of one volume, written as a vector image in the volume's geometry."""
    import numpy as np
    import SimpleITK as sitk

    from pathlib import Path

    output = Path(args.output)
    if output.resolve() == Path(args.volume).resolve():
        raise FetalInpaintError(f"--output {output} is the input volume; give another file name")
    from .features import encode_volume  # torch: after the checks that need none
    from .training import load_checkpoint

    model, metadata = load_checkpoint(args.model, device=args.device)
    source = read_image(args.volume)
    array, spacing = image_volume(source)
    features = encode_volume(model, array, spacing, metadata, pca_components=args.pca or None, device=args.device)
    if source.GetDimension() == 2:
        features = features[:, 0]  # the one slice: a 2D image gets 2D features
    image = sitk.GetImageFromArray(np.moveaxis(features, 0, -1), isVector=True)
    image.CopyInformation(source)  # origin, spacing and axis directions of the volume
    partial = output.with_name(f".partial-{output.name}")  # same extension, so the same writer
    try:
        sitk.WriteImage(image, str(partial))
        partial.replace(output)  # complete or absent: an interrupted export leaves no half-written file
    except (RuntimeError, OSError) as error:
        partial.unlink(missing_ok=True)
        raise FetalInpaintError(f"cannot write {args.output} ({error}); check the folder and the extension "
                                "(.nrrd, .nii.gz, .mha).") from error
    print(json.dumps({"output": str(args.output), "channels": int(features.shape[0])}))
    return EXIT_OK


def _add_evaluate_arguments(parser):
    parser.add_argument("--model", required=True, metavar="MODEL_PT", help="model.pt (its model.json next to it) or its folder")
    parser.add_argument("--volumes", nargs="+", required=True, metavar="FILE",
                        help="held-out image files (evaluating on training volumes flatters the model)")
    parser.add_argument("--corruptors", nargs="+", default=["shapes", "holes"], choices=CORRUPTOR_NAMES,
                        help="corruptions to evaluate (default: shapes holes)")
    parser.add_argument("--strength", type=float, default=None,
                        help="hidden fraction (default: the one the model was trained with)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="one evaluation per seed; mean and standard deviation over them (default: 0 1 2)")
    parser.add_argument("--max-patches", type=int, default=100, help="patches evaluated (default: 100)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")


def _add_export_arguments(parser):
    parser.add_argument("--model", required=True, metavar="MODEL_PT", help="model.pt (its model.json next to it) or its folder")
    parser.add_argument("--volume", required=True, metavar="FILE", help="the image file to compute features for")
    parser.add_argument("--output", required=True, metavar="FILE",
                        help="feature image to write (.nrrd, .nii.gz, .mha): one component per channel")
    parser.add_argument("--pca", type=int, default=0, metavar="N",
                        help="reduce to N principal components (default: 0, every encoder channel)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")


COMMANDS = {
    "train": ("train an inpainting autoencoder on unlabeled volumes", add_train_arguments, run_train),
    "evaluate": ("PSNR and SSIM of a model next to mean fill and biharmonic inpainting", _add_evaluate_arguments,
                 run_evaluate),
    "export": ("write a model's encoder features of a volume as a vector image", _add_export_arguments, run_export),
}


def add_subcommands(subparsers):
    """Add the ``train``, ``evaluate`` and ``export`` commands to an ``argparse`` subparsers object.

    Each command's namespace gets ``func``: ``args.func(args)`` runs it and returns the exit code
    (:data:`EXIT_OK`, or :data:`EXIT_FAILED` with a message on standard error, or :data:`EXIT_INTERRUPTED`).

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        From ``parser.add_subparsers()``.
    """
    for name, (text, add_arguments, run) in COMMANDS.items():
        parser = subparsers.add_parser(name, help=text, description=text)
        add_arguments(parser)
        parser.add_argument("--verbose", action="store_true", help="show the full traceback of an error")
        parser.set_defaults(func=lambda args, run=run: run_command(run, args))


def build_parser():
    """The parser of ``python -m FetalInpaintLib``."""
    parser = argparse.ArgumentParser(prog="python -m FetalInpaintLib", description=__doc__.split("\n")[0])
    add_subcommands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def run_command(run, args):
    """Run a command; a user error becomes a message on standard error and :data:`EXIT_FAILED`.

    Parameters
    ----------
    run : callable
        ``run(args) -> int``.
    args : argparse.Namespace
        With ``verbose``: print the traceback of a user error too.

    Returns
    -------
    int
    """
    try:
        return run(args)
    except (FetalInpaintError, OSError, MemoryError) as error:  # user errors: bad input, files, too large
        if args.verbose:
            traceback.print_exc()
        message = str(error) if isinstance(error, FetalInpaintError) else f"{type(error).__name__}: {error}"
        print(f"error: {message}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def main(argv=None):
    """Parse ``argv`` and run the command; returns the exit code (argparse exits with 2 on usage errors)."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
