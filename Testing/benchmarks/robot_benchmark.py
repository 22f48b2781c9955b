"""Robot-user benchmark of the FetalAnnotate engine against its baselines (docs/benchmarks.md).

Every method gets the same robot user (robot_user.py): round-0 strokes on one slice, then
one correction stroke per round on the largest error blob. Each (method, dataset) pair runs
in its own subprocess so that its peak RSS is its own.

    .venv/bin/python Testing/benchmarks/robot_benchmark.py                 # everything
    .venv/bin/python Testing/benchmarks/robot_benchmark.py --dataset fetal_mri_mialsrtk_sub01 \
        --methods engine,growcut-full --limit 2 --json out.json

Rounds run until ``--rounds`` (Dice at rounds 0/5/10) and further, up to ``--cap``, only while
Dice 0.9 has not been reached (rounds-to-0.9). ``--seeds N`` runs every method that trains a
forest with random states 0..N-1 and reports the mean over them and, per dataset, the spread
of the dataset means between seeds (GrowCut is deterministic: one run). ``--styles`` draws
round 0 in other ways a person might (robot_user.BINARY_STYLES: a closed ring, arcs, dabs, a
thick brush, two slices, dabs then the ring as the first correction, the arcs-plus-loop
case that misleads outline mode, a slip undone at round 5, a slip of round 2 erased at round 5,
the session opened again at round 5, and a new session with nothing to take up at round 5);
each style is reported on its own rows, and the undo, the erasing, the opening or the new
session also on a line of its own. Not part of CI.

The robot draws each method its own corrections, so one stroke landing elsewhere changes every
later round, and two engines that differ little can differ by a collapse. ``--record DIR`` saves
the strokes of every round of one method's runs; ``--replay DIR`` gives every method those
strokes instead, with the random state they were drawn with (not for the session-event styles):

    .venv/bin/python Testing/benchmarks/robot_benchmark.py --dataset fetal_mri_mialsrtk_sub01 --cap 10 \
        --seeds 3 --no-synthetic --methods engine-outline --record strokes/outline
    .venv/bin/python Testing/benchmarks/robot_benchmark.py --dataset fetal_mri_mialsrtk_sub01 --cap 10 \
        --seeds 3 --no-synthetic --methods engine,engine-outline --replay strokes/outline
"""

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPOSITORY_ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPOSITORY_ROOT / "FetalAnnotate"))

import robot_user  # noqa: E402
from FetalAnnotateLib.features import slice_axis  # noqa: E402

ALL_METHODS = ("engine", "engine-outline", "engine-table1", "growcut-extent", "growcut-full", "skimage", "paper")
DETERMINISTIC_METHODS = ("growcut-extent", "growcut-full")


# --------------------------------------------------------------------------- methods
class EngineMethod:
    """This engine through its public API; ``predict`` is one interactive round."""

    def __init__(self, image, spacing, axis, **session_options):
        from FetalAnnotateLib import AnnotationSession

        self.session = AnnotationSession(image, spacing, **session_options)
        self.last_result = None

    def predict(self, strokes):
        return self.predict_labels(strokes) == robot_user.FOREGROUND

    def predict_labels(self, strokes):
        self.last_result = self.session.update(strokes)
        return self.last_result.labels

    def take_up(self, other, strokes):
        """Take up ``other``'s last update of ``strokes`` (a scene opened again)."""
        self.session.resume(strokes, other.last_result.probabilities)


def make_method(name, image, spacing, axis, seed=0):
    """Build the named method on one image (this is the timed setup); ``seed`` is the random
    state of the methods that train a forest."""
    import baselines

    if name == "engine":
        return EngineMethod(image, spacing, axis, random_state=seed)
    if name == "engine-options":  # session options as JSON in $FA_ENGINE_OPTIONS (experiments)
        import json
        import os

        options = {"random_state": seed, **json.loads(os.environ.get("FA_ENGINE_OPTIONS", "{}"))}
        return EngineMethod(image, spacing, axis, **options)
    if name == "engine-outline":  # outline mode: a closed ring of strokes teaches its inside
        from FetalAnnotateLib import OUTLINE_MARGIN_MM

        return EngineMethod(image, spacing, axis, enclosure_margin_mm=OUTLINE_MARGIN_MM, random_state=seed)
    if name == "engine-table1":
        return EngineMethod(image, spacing, axis, preset="paper-table1", spatial_context=False, random_state=seed)
    if name == "growcut-extent":
        return baselines.GrowCut(image, spacing, axis, restrict_extent=True)
    if name == "growcut-full":
        return baselines.GrowCut(image, spacing, axis, restrict_extent=False)
    if name == "skimage":
        return baselines.SkimageTrainable(image, spacing, axis, seed=seed)
    if name == "paper":
        return baselines.PaperTable1(image, spacing, axis, seed=seed)
    raise SystemExit(f"unknown method {name!r}; choose from {', '.join(ALL_METHODS)}")


# --------------------------------------------------------------------------- data
def read_volume_case(row, root):
    """Image (float32 z,y,x), the label volume as stored, spacing (z,y,x mm) of a volume case."""
    import SimpleITK as sitk

    itk_image = sitk.ReadImage(str(root / row["image"]))
    image = sitk.GetArrayFromImage(itk_image).astype(np.float32)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(root / row["label"])))
    return image, labels, tuple(itk_image.GetSpacing()[::-1])


def load_case(row, root, thicken=1):
    """Image (float32 z,y,x), boolean target, spacing (z,y,x mm), acquisition axis.

    PNG images are one slice with 1 mm pixels, as in the reference harness. ``thicken`` > 1
    turns an isotropic volume into a thick-slice stack: every ``thicken`` slices along the first
    axis are averaged into one (the target: where most of them are target), so the atlas volumes
    also test what the engine does with thick slices; stacks and 2D images are left as they are.
    """
    path, label_path = root / row["image"], root / row["label"]
    if path.suffix == ".png":
        from PIL import Image

        image = np.array(Image.open(path).convert("L"), np.float32)[np.newaxis]
        target = np.array(Image.open(label_path).convert("L"))[np.newaxis] > 0
        return image, target, (1.0, 1.0, 1.0), 0
    image, label, spacing = read_volume_case(row, root)
    value = int(row["label_value"] or 0)
    target = (label == value) if value else (label > 0)
    if thicken > 1 and slice_axis(spacing, image.shape) is None:
        n_slices = image.shape[0] // thicken
        image = image[: n_slices * thicken].reshape((n_slices, thicken) + image.shape[1:]).mean(axis=1)
        target = target[: n_slices * thicken].reshape((n_slices, thicken) + target.shape[1:]).mean(axis=1) > 0.5
        spacing = (spacing[0] * thicken,) + spacing[1:]
    return image, target, spacing, robot_user.acquisition_axis(spacing)


def read_manifest(manifest, dataset=None, limit=0):
    with open(manifest, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if not dataset or row["dataset"] == dataset]
    return rows[:limit] if limit else rows


# --------------------------------------------------------------------------- protocol
def timed_setup(method_name, image, spacing, axis, seed):
    """The named method built on ``image`` and the seconds it took (the setup time of the tables)."""
    start = time.perf_counter()
    method = make_method(method_name, image, spacing, axis, seed)
    return method, time.perf_counter() - start


def run_case(method_name, row, root, rounds, cap, target_dice=0.9, seed=0, thicken=1, style="robot", record=None):
    """Robot-user session of one method on one case (``thicken``: see :func:`load_case`; ``style``:
    how round 0 is drawn, one of ``robot_user.BINARY_STYLES``). ``record``: a path where the
    strokes of every round are saved for :func:`replay_case` (styles without a session event only)."""
    image, target, spacing, axis = load_case(row, root, thicken)
    method, setup_s = timed_setup(method_name, image, spacing, axis, seed)
    strokes = robot_user.initial_strokes(target, axis, style)
    dices, round_s, event, slip, sequence = [], [], None, None, []

    def score(labels):
        return robot_user.dice(labels == robot_user.FOREGROUND, target)

    for index in range(cap + 1):
        if record is not None:
            sequence.append(strokes.copy())
        start = time.perf_counter()
        prediction = method.predict(strokes)
        round_s.append(time.perf_counter() - start)
        dices.append(robot_user.dice(prediction, target))
        reached = max(dices) >= target_dice
        if index == cap or (index >= rounds and reached):
            break
        if style == robot_user.UNDO_STYLE and index == robot_user.UNDO_ROUND - 1:
            event, prediction = slip_and_undo(method, strokes, target, prediction, axis)
        if style == robot_user.ERASE_STYLE and index == robot_user.UNDO_ROUND - 1 and slip is not None:
            event, labels = erase_slip(method, strokes, slip, score, dices[-1])
            prediction = labels == robot_user.FOREGROUND
        if style in (robot_user.REOPEN_STYLE, robot_user.RESTART_STYLE) and index == robot_user.UNDO_ROUND - 1:
            method, (event, labels) = reopen(method, make_method(method_name, image, spacing, axis, seed), strokes,
                                             score, dices[-1], take_up=style == robot_user.REOPEN_STYLE)
            prediction = labels == robot_user.FOREGROUND
        if index == 0 and style == robot_user.RING_LATER_STYLE:
            robot_user.add_ring_stroke(strokes, target, axis)
        elif style == robot_user.ERASE_STYLE and index == robot_user.SLIP_ROUND - 1:
            slip = robot_user.slip_stroke(strokes, lambda s: robot_user.add_correction_stroke(
                s, target, prediction, axis, wrong_class=True))
            if slip is None:
                dices += [dices[-1]] * (max(rounds, 0) - index)
                break
        elif not robot_user.add_correction_stroke(strokes, target, prediction, axis):
            dices += [dices[-1]] * (max(rounds, 0) - index)  # perfect: later rounds keep it
            break
    if record is not None:
        np.savez_compressed(record, *sequence)
    return case_result(row, seed, style, setup_s, dices, round_s, target_dice, event)


def case_result(row, seed, style, setup_s, dices, round_s, target_dice=0.9, event=None):
    """The per-case record that :func:`summarize` reads."""
    hits = [i for i, d in enumerate(dices) if d >= target_dice]
    return {
        "case": row["case"],
        "seed": seed,
        "style": style,
        "setup_s": setup_s,
        "dice": dices,
        "round_s": round_s,
        "rounds_to_target": hits[0] if hits else None,
        "event": event,
    }


def recording_path(folder, dataset, style, case, seed):
    """Where ``--record`` saves, and ``--replay`` reads, the strokes of one run."""
    return Path(folder) / f"{dataset}@{style}@{case}@seed{seed}.npz"


def worker_recording(args, dataset, style, case, seed):
    """The recording a worker's run saves (``--record``) or replays (``--replay``), or None."""
    folder = args.record or args.replay
    return recording_path(folder, dataset, style, case, seed) if folder else None


def recorded_rounds(recording, shape):
    """The strokes of every round saved at ``recording`` (``--record``), checked against the case's ``shape``."""
    if not Path(recording).exists():
        raise SystemExit(f"no recorded strokes at {recording}: record them first with --record")
    with np.load(recording) as rounds:
        sequence = [rounds[f"arr_{index}"] for index in range(len(rounds.files))]
    if sequence and sequence[0].shape != tuple(shape):
        raise SystemExit(f"{recording} holds strokes of shape {sequence[0].shape}, the case {tuple(shape)}: "
                         "replay with the options it was recorded with (--thicken)")
    return sequence


def replay_case(method_name, row, root, recording, target_dice=0.9, seed=0, thicken=1, style="robot"):
    """One method given, round by round, the strokes that :func:`run_case` recorded for another
    (or the same) method: the methods compared on the same strokes, where the robot would draw
    each method its own corrections (one stroke landing elsewhere changes every later round)."""
    image, target, spacing, axis = load_case(row, root, thicken)
    sequence = recorded_rounds(recording, target.shape)
    method, setup_s = timed_setup(method_name, image, spacing, axis, seed)
    dices, round_s = [], []
    for strokes in sequence:
        start = time.perf_counter()
        prediction = method.predict(strokes)
        round_s.append(time.perf_counter() - start)
        dices.append(robot_user.dice(prediction, target))
    return case_result(row, seed, style, setup_s, dices, round_s, target_dice)


def add_record_arguments(parser):
    """``--record`` and ``--replay`` (both robot benchmarks)."""
    parser.add_argument("--record", default="",
                        help="save the strokes of every round of every run in this folder (one method only)")
    parser.add_argument("--replay", default="",
                        help="give every method the strokes saved in this folder by --record, instead of the robot's "
                             "(every recorded round: --cap and --rounds are not read)")


def check_record_arguments(args, styles):
    """Exit with a message where ``--record`` / ``--replay`` cannot be honoured; create the record folder."""
    if args.record and args.replay:
        raise SystemExit("--record and --replay exclude each other")
    if args.record and len(args.methods.split(",")) > 1:
        raise SystemExit("--record saves one method's strokes: name one method in --methods")
    events = [style for style in styles if style in robot_user.SESSION_STYLES]
    if (args.record or args.replay) and events:
        raise SystemExit(f"the {', '.join(events)} style's session events cannot be recorded or replayed")
    if args.record:
        Path(args.record).mkdir(parents=True, exist_ok=True)


def recorded_seeds(method, args):
    """Random states a worker runs: every recorded one when replaying (a deterministic method
    replays the strokes drawn with each), else :func:`seeds_of`."""
    return range(args.seeds) if args.replay else seeds_of(method, args.seeds)


def slip_and_undo(method, strokes, target, prediction, axis):
    """The ``undo`` style's slip: paint the next correction with the wrong class, update, erase
    it again and update. Returns the Dice before, after the slip and after the undo, and the
    prediction after the undo (the one the next stroke corrects)."""
    slipped = strokes.copy()
    robot_user.add_correction_stroke(slipped, target, prediction, axis, wrong_class=True)
    slip_dice = robot_user.dice(method.predict(slipped), target)
    undone = method.predict(strokes)
    return {"before": robot_user.dice(prediction, target), "slip": slip_dice,
            "undone": robot_user.dice(undone, target)}, undone


def erase_slip(method, strokes, slip, score, before):
    """The ``erase`` style's erasing of the slipped stroke (``slip``, from
    ``robot_user.slip_stroke``; in place), and the update after it. Returns the record of
    ``score`` (of a label map) ``before`` and after, and the label map after (the one the next
    stroke corrects)."""
    robot_user.erase_slip(strokes, slip)
    labels = method.predict_labels(strokes)
    return {"before": before, "erased": score(labels)}, labels


def reopen(method, reopened, strokes, score, before, take_up=True):
    """The ``reopen`` and ``restart`` styles: ``reopened``, a new instance of ``method``'s
    method, updates the strokes as a new session; with ``take_up`` it then (an engine) takes up
    ``method``'s last update and updates again (a baseline keeps the new session's). Returns
    ``reopened`` and, as :func:`erase_slip`, the record of ``score`` before, in the new session
    and (``take_up``) taken up, and the last label map."""
    fresh = taken_up = reopened.predict_labels(strokes)
    if not take_up:
        return reopened, ({"before": before, "fresh": score(fresh)}, fresh)
    if isinstance(method, EngineMethod):
        reopened.take_up(method, strokes)
        taken_up = reopened.predict_labels(strokes)
    return reopened, ({"before": before, "fresh": score(fresh), "reopened": score(taken_up)}, taken_up)


#: What the ``undo``, ``erase``, ``reopen`` and ``restart`` styles record, and their printed lines.
EVENT_LINES = {
    ("before", "slip", "undone"): f"slip at round {robot_user.UNDO_ROUND}, {{score}} before / after the slip / "
                                  "after undoing it",
    ("before", "erased"): f"slip of round {robot_user.SLIP_ROUND} erased at round {robot_user.UNDO_ROUND}, "
                          "{score} before / after erasing it",
    ("before", "fresh", "reopened"): f"opened again at round {robot_user.UNDO_ROUND}, {{score}} before / "
                                     "in a new session / taken up",
    ("before", "fresh"): f"a new session at round {robot_user.UNDO_ROUND}, {{score}} before / in it",
}


def event_line(prefix, cases, score="Dice"):
    """The line of the ``undo``, ``erase``, ``reopen`` or ``restart`` style (means over ``cases`` of what
    they recorded), or None for other styles."""
    recorded = [case["event"] for case in cases if case.get("event")]
    if not recorded:
        return None
    keys = next(keys for keys in EVENT_LINES if set(keys) == set(recorded[0]))
    means = " / ".join(f"{np.mean([r[key] for r in recorded]):.3f}" for key in keys)
    return f"{prefix} {EVENT_LINES[keys].format(score=score)}: {means}"


def synthetic_volume(shape=(80, 512, 512), spacing=(3.0, 0.7, 0.7), seed=0):
    """A generated stack: a bright ellipsoid with a darker core in smooth noisy tissue."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    target = (z / 0.5) ** 2 + (y / 0.35) ** 2 + (x / 0.3) ** 2 < 1
    image = 100 + 40 * target + 15 * ((y / 0.15) ** 2 + (x / 0.12) ** 2 < 1) * target
    image = image.astype(np.float32) + rng.normal(0, 12, shape).astype(np.float32)
    return image, target, spacing


def run_synthetic(rounds=3):
    """Setup, seconds per round and single-slice region prediction on the 512x512x80 volume."""
    from FetalAnnotateLib import AnnotationSession

    image, target, spacing = synthetic_volume()
    axis = robot_user.acquisition_axis(spacing)
    start = time.perf_counter()
    session = AnnotationSession(image, spacing)
    setup_s = time.perf_counter() - start
    strokes = robot_user.initial_strokes(target, axis)
    round_s, dices = [], []
    for index in range(rounds + 1):
        start = time.perf_counter()
        labels = session.update(strokes).labels
        round_s.append(time.perf_counter() - start)
        dices.append(robot_user.dice(labels == robot_user.FOREGROUND, target))
        if index < rounds:
            robot_user.add_correction_stroke(strokes, target, labels == robot_user.FOREGROUND, axis)
    region_s = []
    for z in (20, 40, 60):
        start = time.perf_counter()
        session.predict(region=(slice(z, z + 1), slice(None), slice(None)))
        region_s.append(time.perf_counter() - start)
    return {"case": "synthetic-512x512x80", "setup_s": setup_s, "dice": dices, "round_s": round_s,
            "region_slice_s": float(np.median(region_s))}


# --------------------------------------------------------------------------- driver
def seeds_of(method, n_seeds):
    """Random states a method runs with: 0..n_seeds-1, or just 0 for a deterministic method."""
    return [0] if method in DETERMINISTIC_METHODS else range(n_seeds)


def print_worker_result(cases):
    """Print a worker's cases and its peak RSS as the JSON line :func:`run_jobs` reads."""
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"cases": cases, "peak_rss_mb": peak_kib / 1024.0}))


def run_jobs(script, jobs, options):
    """Run ``script --worker JOB options...`` for every job, each in its own process (its own peak
    RSS); returns {job: the worker's JSON result}."""
    results = {}
    for job in jobs:
        print(f"running {job}", file=sys.stderr, flush=True)
        command = [sys.executable, str(script), "--worker", job] + list(options)
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        results[job] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def parse_styles(text, choices):
    """The comma-separated ``--styles`` value as a list, or exit naming the choices."""
    styles = [style for style in text.split(",") if style]
    unknown = [style for style in styles if style not in choices]
    if unknown or not styles:
        raise SystemExit(f"unknown drawing style {', '.join(unknown) or text!r}; choose from {', '.join(choices)}")
    return styles


def worker(args):
    """Run one method on one dataset in one drawing style (or the synthetic case) and print JSON."""
    if args.worker == "synthetic":
        cases = [run_synthetic()]
    else:
        method, dataset, style = args.worker.split("@", 2)
        manifest = Path(args.manifest)
        rows = read_manifest(manifest, dataset, args.limit)
        cases = []
        for seed in recorded_seeds(method, args):
            for row in rows:
                recording = worker_recording(args, dataset, style, row["case"], seed)
                if args.replay:
                    cases.append(replay_case(method, row, manifest.parent, recording, seed=seed,
                                             thicken=args.thicken, style=style))
                else:
                    cases.append(run_case(method, row, manifest.parent, args.rounds, args.cap, seed=seed,
                                          thicken=args.thicken, style=style, record=recording))
                print(f"  {method:15s} {style:10s} {row['case'][:34]:34s} seed {seed} dice "
                      + " ".join(f"{d:.3f}" for d in cases[-1]["dice"][:11]), file=sys.stderr, flush=True)
    print_worker_result(cases)


def summarize(cases, rounds, cap):
    """Mean Dice at rounds 0/5/10 and over rounds 1-10, the largest one-round drop of Dice in
    rounds 1-10 (mean over cases; 0 when a correction never made the result worse), mean rounds
    to 0.9 (unreached counted as cap), timings; all over every (case, seed) run. Single rounds of
    single cases swing by +-0.1 as one stroke lands elsewhere; the mean over rounds 1-10 is the
    steadier comparison. With several seeds, ``sd_r0`` and ``sd_r1_r10`` are the standard
    deviations of the dataset means between seeds (how much the forest's randomness alone moves
    the figures)."""
    def at(dices, index):
        return dices[min(index, len(dices) - 1)]

    def seed_spread(value):
        seeds = sorted({c["seed"] for c in cases})
        if len(seeds) < 2:
            return 0.0
        return float(np.std([np.mean([value(c["dice"]) for c in cases if c["seed"] == s]) for s in seeds], ddof=1))

    def mean_r1_r10(dices):
        return np.mean([at(dices, i) for i in range(1, 11)])

    reached = [c["rounds_to_target"] for c in cases]
    return {
        "n": len({c["case"] for c in cases}),
        "seeds": len({c["seed"] for c in cases}),
        "dice_r0": float(np.mean([at(c["dice"], 0) for c in cases])),
        "dice_r5": float(np.mean([at(c["dice"], 5) for c in cases])),
        "dice_r10": float(np.mean([at(c["dice"], 10) for c in cases])),
        "dice_r1_r10": float(np.mean([mean_r1_r10(c["dice"]) for c in cases])),
        "sd_r0": seed_spread(lambda dices: at(dices, 0)),
        "sd_r1_r10": seed_spread(mean_r1_r10),
        "worst_drop": float(np.mean([max(0.0, max(at(c["dice"], i - 1) - at(c["dice"], i) for i in range(1, 11)))
                                     for c in cases])),
        "rounds_to_0.9": float(np.mean([cap if r is None else r for r in reached])),
        "reached_0.9": sum(r is not None for r in reached),
        "setup_s": float(np.mean([c["setup_s"] for c in cases])),
        "median_round_s": float(np.median([s for c in cases for s in c["round_s"]])),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", nargs="?", default=str(REPOSITORY_ROOT.parent / "shared" / "data" / "cases.csv"),
                        help="cases.csv (default ../shared/data/cases.csv from the repository root)")
    parser.add_argument("--dataset", default="", help="only this dataset")
    parser.add_argument("--limit", type=int, default=0, help="first N cases per dataset")
    parser.add_argument("--rounds", type=int, default=10, help="rounds always run (Dice at 0/5/10)")
    parser.add_argument("--cap", type=int, default=20, help="most rounds when Dice 0.9 is not reached")
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--seeds", type=int, default=1, help="random states 0..N-1 of the forest methods")
    parser.add_argument("--thicken", type=int, default=1,
                        help="average every N slices of isotropic volumes into one (thick-slice versions of the atlas)")
    parser.add_argument("--styles", default="robot",
                        help="comma-separated ways of drawing round 0: " + ", ".join(robot_user.BINARY_STYLES)
                             + " (default: %(default)s)")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the 512x512x80 timing case")
    parser.add_argument("--json", default="", help="write all per-case results here")
    add_record_arguments(parser)
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    styles = parse_styles(args.styles, robot_user.BINARY_STYLES)
    check_record_arguments(args, styles)
    rows = read_manifest(args.manifest, args.dataset)
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    jobs = [f"{m}@{d}@{s}" for d in datasets for s in styles for m in args.methods.split(",")]
    if not args.no_synthetic:
        jobs.append("synthetic")
    results = run_jobs(__file__, jobs, [args.manifest, "--limit", str(args.limit), "--rounds", str(args.rounds),
                                        "--cap", str(args.cap), "--seeds", str(args.seeds), "--thicken", str(args.thicken),
                                        "--record", args.record, "--replay", args.replay])
    if args.replay:
        print(f"every method given the strokes recorded in {args.replay}")

    header = (f"{'dataset':26s} {'style':10s} {'method':15s} {'n':>3s} {'Dice r0':>8s} {'r5':>6s} {'r10':>6s} {'r1-10':>6s} {'drop':>6s} "
              f"{'rounds>=0.9':>11s} {'setup s':>8s} {'s/round':>8s} {'peak RSS MB':>11s} {'seeds':>5s} {'sd r0':>6s} {'sd r1-10':>8s}")
    print(header)
    for job, result in results.items():
        if job == "synthetic":
            continue
        method, dataset, style = job.split("@", 2)
        if args.thicken > 1:
            dataset = f"{dataset} /{args.thicken}"
        s = summarize(result["cases"], args.rounds, args.cap)
        result["summary"] = s
        print(f"{dataset:26s} {style:10s} {method:15s} {s['n']:3d} {s['dice_r0']:8.3f} {s['dice_r5']:6.3f} {s['dice_r10']:6.3f} {s['dice_r1_r10']:6.3f} "
              f"{s['worst_drop']:6.3f} "
              f"{s['rounds_to_0.9']:6.1f} ({s['reached_0.9']:2d}) {s['setup_s']:8.2f} {s['median_round_s']:8.2f} {result['peak_rss_mb']:11.0f} "
              f"{s['seeds']:5d} {s['sd_r0']:6.3f} {s['sd_r1_r10']:8.3f}")
    for job, result in results.items():
        method, dataset, _ = job.split("@", 2)
        line = event_line(f"{dataset:26s} {method:15s}", result["cases"])
        if line:
            print(line)
    if "synthetic" in results:
        case = results["synthetic"]["cases"][0]
        print(f"synthetic 512x512x80 engine: setup {case['setup_s']:.2f} s, median {np.median(case['round_s']):.2f} s/round, "
              f"peak RSS {results['synthetic']['peak_rss_mb']:.0f} MB, one 512x512 slice region {case['region_slice_s']:.3f} s, "
              f"Dice {' '.join(f'{d:.3f}' for d in case['dice'])}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
