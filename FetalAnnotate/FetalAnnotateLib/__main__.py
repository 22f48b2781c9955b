"""FetalAnnotate on the command line: ``fetalannotate demo``, ``fetalannotate apply``, ``fetalannotate inpaint``.

``demo`` segments a generated pregnancy phantom from one slice of strokes and writes files that
3D Slicer opens (volume, stroke and result segmentations, probability maps, the classifier);
``apply`` segments many volumes with a saved classifier and writes a volumetry report;
``inpaint`` trains, evaluates and exports FetalInpaint's self-supervised features.

Exit codes: 0 success, 1 some volumes failed, 2 nothing done (a usage error or refused input;
the message says what to do, ``--verbose`` adds the traceback), 130 interrupted (Ctrl+C).
"""

import argparse
import sys
import time
import traceback
from pathlib import Path

from .batch import apply_classifier_to_files, read_file_list
from .classifier_io import save_classifier
from .engine import AnnotationSession
from .metrics import dice
from .phantom import example_strokes, make_phantom
from .segio import atomic_path, write_segmentation
from .validation import FetalAnnotateError

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _write_volume(path, array, spacing):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing[::-1]])
    with atomic_path(path) as temporary:
        sitk.WriteImage(image, temporary, useCompression=True)


def demo_file_names(class_names):
    """The files :func:`run_demo` writes, in the order it writes them.

    Parameters
    ----------
    class_names : sequence of str
        The phantom's classes.

    Returns
    -------
    list of str
    """
    return ["phantom.nrrd", "phantom_strokes.seg.nrrd", "phantom_auto.seg.nrrd",
            *[f"phantom_{name}_probability.nrrd" for name in class_names], "phantom_classifier.skops"]


def run_demo(output_dir, seed=0, overwrite=False, print_fn=print):
    """Segment the phantom from one slice of strokes and write the files Slicer opens.

    Parameters
    ----------
    output_dir : str or Path
        Folder for ``phantom.nrrd``, ``phantom_strokes.seg.nrrd``, ``phantom_auto.seg.nrrd``,
        ``phantom_<class>_probability.nrrd`` and ``phantom_classifier.skops``.
    seed : int, default 0
        Phantom seed.
    overwrite : bool, default False
        Replace those files where they exist; without it, an existing one is refused before any work.
    print_fn : callable, default print
        Where progress lines go.

    Returns
    -------
    dict
        Class name -> Dice of the automatic segment against the phantom's truth.

    Raises
    ------
    FetalAnnotateError
        ``output_dir`` is a file, or holds a file the demo writes (without ``overwrite``).
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FetalAnnotateError(f"{output_dir} is a file; give a folder for the demo files (it is created if needed)")
    phantom = make_phantom(seed=seed)
    strokes = example_strokes(phantom.label_map)
    names = [phantom.class_names[value] for value in sorted(phantom.class_names)]
    existing = [name for name in demo_file_names(names) if (output_dir / name).exists()]
    if existing and not overwrite:
        raise FetalAnnotateError(f"{output_dir} already holds {', '.join(existing)}; give --overwrite to replace "
                                 "them, or another --output folder")
    output_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    session = AnnotationSession(phantom.image, phantom.spacing)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    result = session.update(strokes)
    round_s = time.perf_counter() - start
    print_fn(f"phantom {phantom.image.shape} voxels, {phantom.spacing} mm: features {setup_s:.2f} s, "
             f"train + predict {round_s:.2f} s")

    _write_volume(output_dir / "phantom.nrrd", phantom.image, phantom.spacing)
    write_segmentation(output_dir / "phantom_strokes.seg.nrrd", strokes, names, spacing=phantom.spacing)
    write_segmentation(output_dir / "phantom_auto.seg.nrrd", result.labels, [f"{name} (auto)" for name in names],
                       spacing=phantom.spacing)
    for value, probability in zip(result.classes, result.probabilities):
        _write_volume(output_dir / f"phantom_{phantom.class_names[value]}_probability.nrrd", probability, phantom.spacing)
    save_classifier(output_dir / "phantom_classifier.skops", session.pixel_classifier(), names,
                    metadata={"trained_on": "FetalAnnotateLib phantom", "seed": seed})

    scores = {}
    for value in result.classes:
        scores[phantom.class_names[value]] = dice(result.labels == value, phantom.label_map == value)
        print_fn(f"  {phantom.class_names[value]:>10s} (auto): Dice {scores[phantom.class_names[value]]:.3f}")
    print_fn(f"wrote {output_dir}/: open phantom.nrrd, phantom_strokes.seg.nrrd and phantom_auto.seg.nrrd in 3D Slicer")
    return scores


class ProgressDisplay:
    """Progress for the terminal: a bar with ETA on a terminal, plain lines when output is piped.

    Parameters
    ----------
    stream : file, default sys.stderr
        Where to write; a bar is drawn only when it is a terminal.
    """

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self._bar = ""
        self._start = None
        self._drawn = 0.0

    def progress(self, fraction, message):
        """``progress(fraction, message)`` callback: redraw the bar (at most 10 times a second)."""
        now = time.monotonic()
        if self._start is None:
            self._start = (now, fraction)
        if not self.interactive or (now - self._drawn < 0.1 and fraction < 1.0):
            return False
        self._drawn = now
        started, first = self._start
        eta = (now - started) * (1.0 - fraction) / (fraction - first) if fraction > first else None
        filled = int(round(24 * fraction))
        eta_text = "--:--" if eta is None else time.strftime("%H:%M:%S" if eta >= 3600 else "%M:%S", time.gmtime(eta))
        self._bar = f"[{'#' * filled}{'.' * (24 - filled)}] {fraction:4.0%} ETA {eta_text}  {message}"[:120]
        self.stream.write("\r\x1b[K" + self._bar)
        self.stream.flush()
        return False

    def log(self, line):
        """Print a line (above the bar on a terminal)."""
        if self.interactive:
            self.stream.write("\r\x1b[K")
        print(line, file=self.stream)
        if self.interactive and self._bar:
            self.stream.write(self._bar)
        self.stream.flush()

    def close(self):
        """End the bar's line."""
        if self.interactive and self._bar:
            self.stream.write("\n")
            self._bar = ""


def _shard(text):
    """``"K/N"`` -> (K, N) for argparse."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not K/N (e.g. 2/10)") from None
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"shard {text} does not exist; give K/N with 1 <= K <= N")
    return index, count


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _prog():
    """The program name as the user typed it: ``fetalannotate`` or ``python -m FetalAnnotateLib``."""
    script = Path(sys.argv[0] if sys.argv and sys.argv[0] else "fetalannotate")
    return f"python -m {script.parent.name}" if script.name == "__main__.py" else script.name


def build_parser(prog=None):
    """The ``fetalannotate`` command-line parser."""
    from FetalInpaintLib.__main__ import add_subcommands as add_inpaint_subcommands

    parser = argparse.ArgumentParser(prog=prog or _prog(), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("--verbose", action="store_true", help="show the full traceback of errors")

    demo = commands.add_parser("demo", parents=[verbose],
                               help="segment a generated fetal phantom and write Slicer files",
                               description=run_demo.__doc__.split("\n")[0])
    demo.add_argument("--output", default="fetalannotate-demo", metavar="FOLDER",
                      help="folder for the demo files, created if needed (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="phantom seed (default: %(default)s)")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace the demo files that FOLDER already holds (default: refuse and list them)")

    apply = commands.add_parser(
        "apply", parents=[verbose], help="segment many volumes with a saved classifier; volumetry report",
        description="Segment volumes with a saved classifier: one <name>.seg.nrrd per volume and a report "
                    "(fetalannotate-report.csv/.json: per volume status, seconds, voxels and mL per class). "
                    "Existing outputs are kept, so running the same command again continues an interrupted run.")
    apply.add_argument("inputs", nargs="*", metavar="INPUT",
                       help="volume files (NIfTI, NRRD, MetaImage), DICOM series folders, or folders of them; "
                            "other files in folders (segmentations, probability maps...) are skipped and listed")
    apply.add_argument("--classifier", required=True, metavar="FILE", help="a .skops file saved by FetalAnnotate")
    apply.add_argument("--output", required=True, metavar="FOLDER",
                       help="folder for the .seg.nrrd files and the report (created if needed)")
    apply.add_argument("--file-list", metavar="FILE",
                       help="text file with one input per line (relative to its folder), added to INPUT")
    apply.add_argument("--overwrite", action="store_true",
                       help="segment again volumes whose output exists (default: keep and report them); only "
                            "outputs unchanged since the batch wrote them are replaced, a corrected one is kept")
    apply.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                       help="volumes segmented at once in worker processes, one core each (default: %(default)s)")
    apply.add_argument("--memory-gb", type=float, metavar="GB",
                       help="memory the running volumes may use together; fewer than --jobs run when it is short "
                            "(default: half the available memory)")
    apply.add_argument("--shard", type=_shard, metavar="K/N",
                       help="segment only shard K of N of the sorted inputs (every N-th volume from the K-th), "
                            "e.g. $SLURM_ARRAY_TASK_ID/10 on each of 10 machines")
    apply.add_argument("--extra-features", metavar="PATTERN",
                       help="for a classifier trained with extra feature channels: each volume's feature volume, "
                            "{name} standing for the volume's name, e.g. 'features/{name}_features.nrrd'")

    inpaint = commands.add_parser("inpaint", help="train, evaluate or export FetalInpaint's self-supervised features",
                                  description="FetalInpaint: an inpainting autoencoder's features as extra channels")
    add_inpaint_subcommands(inpaint.add_subparsers(dest="inpaint_command", required=True, metavar="COMMAND"))
    return parser


def run_apply(args, display):
    """The ``apply`` command; returns the exit code."""
    inputs = list(args.inputs) + (read_file_list(args.file_list) if args.file_list else [])
    if not inputs:
        raise FetalAnnotateError("give input volumes or folders, or --file-list")
    result = apply_classifier_to_files(
        args.classifier, inputs, args.output, overwrite=args.overwrite, jobs=args.jobs,
        memory_budget=None if args.memory_gb is None else int(args.memory_gb * 2**30), shard=args.shard,
        extra_features=args.extra_features, progress=display.progress, log=display.log)
    display.close()
    for item in result.failed:
        if args.verbose and item.details:
            display.log(item.details)
    kept = sum(item.status == "existing" for item in result.items)
    display.log(f"{len(result.items) - len(result.failed)} of {len(result.items)} volumes done ({kept} kept from "
                f"before), {len(result.failed)} failed; report: {result.report_csv}")
    return EXIT_SOME_FAILED if result.failed else EXIT_OK


def main(argv=None):
    """Run the command line; returns the exit code (0 ok, 1 some volumes failed, 2 nothing done)."""
    args = build_parser().parse_args(argv)
    if args.command == "inpaint":
        return args.func(args)
    display = ProgressDisplay()
    try:
        if args.command == "demo":
            run_demo(args.output, args.seed, args.overwrite)
            return EXIT_OK
        return run_apply(args, display)
    except (FetalAnnotateError, OSError) as error:
        display.close()
        if args.verbose:
            traceback.print_exc()
        print(f"{_prog()}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        display.close()
        print(f"{_prog()}: interrupted; finished outputs are kept: run the same command again to continue",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # a bug, not bad input: a message, and the traceback on request
        display.close()
        if args.verbose:
            traceback.print_exc()
        print(f"{_prog()}: unexpected {type(error).__name__}: {error}; run again with --verbose for the traceback "
              "and report it", file=sys.stderr)
        return EXIT_SOME_FAILED


if __name__ == "__main__":
    sys.exit(main())
