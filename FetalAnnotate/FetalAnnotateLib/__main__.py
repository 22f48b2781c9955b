"""Command line: ``python -m FetalAnnotateLib {demo,apply} ...`` (also installed as ``fetalannotate``).

``demo`` segments a generated pregnancy phantom from one slice of strokes and writes files that
3D Slicer opens (volume, stroke and result segmentations, probability maps, the classifier);
``apply`` segments volumes with a saved classifier, as the batch loop in docs/user-guide.md.
"""

import argparse
import sys
import time
from pathlib import Path

from .batch import apply_classifier_to_files
from .classifier_io import save_classifier
from .engine import AnnotationSession
from .metrics import dice
from .phantom import example_strokes, make_phantom
from .segio import write_segmentation


def _write_volume(path, array, spacing):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing[::-1]])
    sitk.WriteImage(image, str(path), useCompression=True)


def run_demo(output_dir, seed=0, print_fn=print):
    """Segment the phantom from one slice of strokes and write the files Slicer opens.

    Parameters
    ----------
    output_dir : str or Path
        Folder for ``phantom.nrrd``, ``phantom_strokes.seg.nrrd``, ``phantom_auto.seg.nrrd``,
        ``phantom_<class>_probability.nrrd`` and ``phantom_classifier.skops``.
    seed : int, default 0
        Phantom seed.
    print_fn : callable, default print
        Where progress lines go.

    Returns
    -------
    dict
        Class name -> Dice of the automatic segment against the phantom's truth.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    phantom = make_phantom(seed=seed)
    strokes = example_strokes(phantom.label_map)
    names = [phantom.class_names[value] for value in sorted(phantom.class_names)]

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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m FetalAnnotateLib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="segment a generated fetal phantom and write Slicer files")
    demo.add_argument("--output", default="fetalannotate-demo", help="output folder (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="phantom seed (default: %(default)s)")
    apply = commands.add_parser("apply", help="segment volumes with a saved classifier")
    apply.add_argument("--classifier", required=True, help="a .skops file saved by FetalAnnotate")
    apply.add_argument("inputs", nargs="+", help="volume files, DICOM folders, or folders of volumes")
    apply.add_argument("--output", required=True, help="folder for the .seg.nrrd files")
    args = parser.parse_args(argv)

    if args.command == "demo":
        run_demo(args.output, args.seed)
        return 0
    items = apply_classifier_to_files(args.classifier, args.inputs, args.output,
                                      progress=lambda fraction, message: print(f"[{fraction:4.0%}] {message}"))
    for item in items:
        print(f"{item.source} -> {item.output}" if item.error is None else f"{item.source}: FAILED: {item.error}")
    return 0 if all(item.error is None for item in items) else 1


if __name__ == "__main__":
    sys.exit(main())
