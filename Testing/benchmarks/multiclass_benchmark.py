"""Multi-class robot-user benchmark of the FetalAnnotate engine against its baselines (docs/benchmarks.md).

Datasets: the atlas volumes of the development data with all their classes (outside the brain
and the eight tissues of ``parcellation.nii.gz``: 9 classes) and generated pregnancy phantoms
(FetalAnnotateLib.phantom: background, fetus, placenta; random seeds 0, 1, 2). The robot user
(robot_user.py) paints round 0 on the slice where the classes are best represented, one stroke
in every component of every class; each later round adds one stroke on the largest error blob,
every pixel painted with its true class. Reported per round: Dice of every class and their mean.

    .venv/bin/python Testing/benchmarks/multiclass_benchmark.py --dataset phantom --cap 3
    .venv/bin/python Testing/benchmarks/multiclass_benchmark.py --dataset fetal_mri_sb_atlas --limit 3 --seeds 3

Each (method, dataset, style) runs in its own process so that its peak RSS is its own (the
helpers of robot_benchmark.py). ``--record DIR`` and ``--replay DIR`` save one method's strokes
and give every method those strokes, as in robot_benchmark.py. Not part of CI.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import robot_benchmark  # noqa: E402  (puts FetalAnnotate on sys.path)
import robot_user  # noqa: E402

ALL_METHODS = ("engine", "engine-outline", "growcut-extent", "growcut-full", "skimage", "paper")
PHANTOM = "phantom"
PHANTOM_SEEDS = (0, 1, 2)
ATLAS = "fetal_mri_sb_atlas"
#: Atlas classes: ``parcellation.nii.gz`` value + 1 (stroke value 0 means unpainted).
ATLAS_CLASS_NAMES = {1: "outside brain", 2: "white matter", 3: "ventricles", 4: "cerebellum", 5: "extra-axial CSF",
                     6: "cortical grey matter", 7: "deep grey matter", 8: "brainstem", 9: "corpus callosum"}


def dataset_cases(dataset, manifest, limit=0):
    """Case rows of a dataset: the manifest's rows, or one row per phantom seed."""
    if dataset == PHANTOM:
        rows = [{"case": f"phantom-seed{seed}", "phantom_seed": seed} for seed in PHANTOM_SEEDS]
        return rows[:limit] if limit else rows
    return robot_benchmark.read_manifest(manifest, dataset, limit)


def load_class_case(row, root):
    """Image (float32 z,y,x), truth label map (values >= 1), spacing (z,y,x mm), class names."""
    if "phantom_seed" in row:
        from FetalAnnotateLib.phantom import make_phantom

        phantom = make_phantom(seed=row["phantom_seed"])
        return phantom.image, phantom.label_map, phantom.spacing, phantom.class_names
    if row["dataset"] != ATLAS:
        raise SystemExit(f"no class names for dataset {row['dataset']!r}; the multi-class datasets are {ATLAS}, {PHANTOM}")
    image, parcellation, spacing = robot_benchmark.read_volume_case(row, root)
    return image, (parcellation + 1).astype(np.uint8), spacing, ATLAS_CLASS_NAMES


def run_case(method_name, row, root, cap, seed=0, style="robot", record=None):
    """Robot-user session of one method on one multi-class case: round 0 and ``cap`` corrections
    (``record``: see ``robot_benchmark.run_case``)."""
    image, truth, spacing, class_names = load_class_case(row, root)
    axis = robot_user.acquisition_axis(spacing)
    classes = sorted(class_names)
    method, setup_s = robot_benchmark.timed_setup(method_name, image, spacing, axis, seed)
    strokes = robot_user.initial_class_strokes(truth, axis, style if style in robot_user.STYLES else "robot")
    class_dice, round_s, event, slip, sequence = [], [], None, None, []

    def score(labels):
        return float(np.mean(robot_user.class_dices(truth, labels, classes)))

    for index in range(cap + 1):
        if record is not None:
            sequence.append(strokes.copy())
        start = time.perf_counter()
        labels = method.predict_labels(strokes)
        round_s.append(time.perf_counter() - start)
        class_dice.append(robot_user.class_dices(truth, labels, classes))
        if index == cap:
            break
        if style == robot_user.ERASE_STYLE and index == robot_user.UNDO_ROUND - 1 and slip is not None:
            event, labels = robot_benchmark.erase_slip(method, strokes, slip, score, score(labels))
        if style in (robot_user.REOPEN_STYLE, robot_user.RESTART_STYLE) and index == robot_user.UNDO_ROUND - 1:
            method, (event, labels) = robot_benchmark.reopen(
                method, robot_benchmark.make_method(method_name, image, spacing, axis, seed), strokes, score,
                score(labels), take_up=style == robot_user.REOPEN_STYLE)
        if index == 0 and style == robot_user.RING_LATER_STYLE:
            robot_user.add_class_ring_stroke(strokes, truth, axis)
        elif style == robot_user.ERASE_STYLE and index == robot_user.SLIP_ROUND - 1:
            slip = robot_user.slip_stroke(strokes, lambda s: robot_user.add_class_correction_stroke(
                s, truth, labels, axis, wrong_class=True))
            if slip is None:
                class_dice += [class_dice[-1]] * (cap - index)
                break
        elif not robot_user.add_class_correction_stroke(strokes, truth, labels, axis):
            class_dice += [class_dice[-1]] * (cap - index)  # perfect: later rounds keep it
            break
    if record is not None:
        np.savez_compressed(record, *sequence)
    return class_case_result(row, seed, style, setup_s, [class_names[value] for value in classes], class_dice,
                             round_s, event)


def class_case_result(row, seed, style, setup_s, names, class_dice, round_s, event=None):
    """The per-case record that ``robot_benchmark.summarize`` and :func:`class_summary` read."""
    mean_dice = [float(np.mean(dices)) for dices in class_dice]
    return {
        "case": row["case"],
        "seed": seed,
        "style": style,
        "setup_s": setup_s,
        "classes": names,
        "class_dice": class_dice,
        "dice": mean_dice,
        "round_s": round_s,
        "rounds_to_target": next((i for i, d in enumerate(mean_dice) if d >= 0.9), None),
        "event": event,
    }


def replay_case(method_name, row, root, recording, seed=0, style="robot"):
    """One method given the strokes that :func:`run_case` recorded (see ``robot_benchmark.replay_case``)."""
    image, truth, spacing, class_names = load_class_case(row, root)
    sequence = robot_benchmark.recorded_rounds(recording, truth.shape)
    classes = sorted(class_names)
    method, setup_s = robot_benchmark.timed_setup(method_name, image, spacing, robot_user.acquisition_axis(spacing),
                                                  seed)
    class_dice, round_s = [], []
    for strokes in sequence:
        start = time.perf_counter()
        labels = method.predict_labels(strokes)
        round_s.append(time.perf_counter() - start)
        class_dice.append(robot_user.class_dices(truth, labels, classes))
    return class_case_result(row, seed, style, setup_s, [class_names[value] for value in classes], class_dice, round_s)


def worker(args):
    """Run one method on one dataset in one drawing style and print JSON."""
    method, dataset, style = args.worker.split("@", 2)
    manifest = Path(args.manifest)
    cases = []
    for seed in robot_benchmark.recorded_seeds(method, args):
        for row in dataset_cases(dataset, manifest, args.limit):
            recording = robot_benchmark.worker_recording(args, dataset, style, row["case"], seed)
            if args.replay:
                cases.append(replay_case(method, row, manifest.parent, recording, seed=seed, style=style))
            else:
                cases.append(run_case(method, row, manifest.parent, args.cap, seed=seed, style=style, record=recording))
            print(f"  {method:15s} {style:10s} {row['case'][:34]:34s} seed {seed} class-mean Dice "
                  + " ".join(f"{d:.3f}" for d in cases[-1]["dice"][:11]), file=sys.stderr, flush=True)
    robot_benchmark.print_worker_result(cases)


def class_summary(cases, rounds=10):
    """Per class: mean over (case, seed) runs of the Dice at round 0 and over rounds 1..``rounds``."""
    def at(values, index):
        return values[min(index, len(values) - 1)]

    round0 = np.mean([at(c["class_dice"], 0) for c in cases], axis=0)
    later = np.mean([np.mean([at(c["class_dice"], i) for i in range(1, rounds + 1)], axis=0) for c in cases], axis=0)
    return {"classes": cases[0]["classes"], "dice_r0": round0.tolist(), "dice_r1_r10": later.tolist()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", nargs="?",
                        default=str(robot_benchmark.REPOSITORY_ROOT.parent / "shared" / "data" / "cases.csv"),
                        help="cases.csv (default ../shared/data/cases.csv from the repository root); "
                             "not read for the phantom alone")
    parser.add_argument("--dataset", default="", help=f"only this dataset: {ATLAS} or {PHANTOM} (default both)")
    parser.add_argument("--limit", type=int, default=0, help="first N cases per dataset")
    parser.add_argument("--cap", type=int, default=10, help="correction rounds after round 0 (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--seeds", type=int, default=1, help="random states 0..N-1 of the forest methods")
    parser.add_argument("--styles", default="robot",
                        help="comma-separated ways of drawing round 0: " + ", ".join(robot_user.CLASS_STYLES)
                             + " (default: %(default)s)")
    parser.add_argument("--json", default="", help="write all per-case results here")
    robot_benchmark.add_record_arguments(parser)
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    styles = robot_benchmark.parse_styles(args.styles, robot_user.CLASS_STYLES)
    robot_benchmark.check_record_arguments(args, styles)
    datasets = [args.dataset] if args.dataset else [ATLAS, PHANTOM]
    jobs = [f"{m}@{d}@{s}" for d in datasets for s in styles for m in args.methods.split(",")]
    results = robot_benchmark.run_jobs(__file__, jobs, [args.manifest, "--limit", str(args.limit),
                                                        "--cap", str(args.cap), "--seeds", str(args.seeds),
                                                        "--record", args.record, "--replay", args.replay])
    if args.replay:
        print(f"every method given the strokes recorded in {args.replay}")

    print(f"{'dataset':20s} {'style':10s} {'method':15s} {'n':>3s} {'seeds':>5s} {'class-mean Dice r0':>18s} {'r5':>6s} "
          f"{'r10':>6s} {'r1-10':>6s} {'drop':>6s} {'setup s':>8s} {'s/round':>8s} {'peak RSS MB':>11s}")
    for job, result in results.items():
        method, dataset, style = job.split("@", 2)
        s = robot_benchmark.summarize(result["cases"], 10, args.cap)
        result["summary"] = {**s, **class_summary(result["cases"])}
        run = [f"{s[f'dice_r{i}']:6.3f}" if args.cap >= i else f"{'-':>6s}" for i in (5, 10)]  # rounds not run: -
        print(f"{dataset:20s} {style:10s} {method:15s} {s['n']:3d} {s['seeds']:5d} {s['dice_r0']:18.3f} {run[0]} "
              f"{run[1]} {s['dice_r1_r10']:6.3f} {s['worst_drop']:6.3f} {s['setup_s']:8.2f} "
              f"{s['median_round_s']:8.2f} {result['peak_rss_mb']:11.0f}")
    if args.cap < 10:
        print(f"(--cap {args.cap}: r1-10 and drop over rounds 1-{args.cap}, the last repeated)")
    for job, result in results.items():
        method, dataset, _ = job.split("@", 2)
        line = robot_benchmark.event_line(f"{dataset:20s} {method:15s}", result["cases"], "class-mean Dice")
        if line:
            print(line)
    print("\nper-class Dice, round 0 / mean of rounds 1-10:")
    for job, result in results.items():
        method, dataset, style = job.split("@", 2)
        summary = result["summary"]
        print(f"{dataset:20s} {style:10s} {method:15s} " + ", ".join(
            f"{name} {r0:.2f}/{later:.2f}"
            for name, r0, later in zip(summary["classes"], summary["dice_r0"], summary["dice_r1_r10"])))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
