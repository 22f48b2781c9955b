"""Throughput of ``fetalannotate apply`` with one and two worker processes and in three shards.

Generates ``--count`` phantom stacks of 22 x 320 x 320 voxels (``FetalAnnotateLib.phantom``) in a
temporary folder, trains and saves a classifier on another phantom, then runs the command line
as a user would (a fresh process per run): ``--jobs 1``, ``--jobs 2`` and ``--shard K/3`` for
K = 1, 2, 3 one after the other. It prints volumes per minute, the speed-up of ``--jobs 2``,
the peak memory of each run's process tree (sampled from /proc on Linux) against the memory
budget the command reports, and checks that the ``--jobs 2`` and sharded outputs equal the
``--jobs 1`` ones voxel for voxel. Exit code 1 when they differ.

Usage (from the repository root; on an otherwise idle machine for timings)::

    .venv/bin/python Testing/benchmarks/batch_benchmark.py                 # 40 volumes
    .venv/bin/python Testing/benchmarks/batch_benchmark.py --count 6       # a quick check that it works
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "FetalAnnotate"))

from FetalAnnotateLib import AnnotationSession  # noqa: E402
from FetalAnnotateLib.classifier_io import save_classifier  # noqa: E402
from FetalAnnotateLib.phantom import example_strokes, make_phantom  # noqa: E402

#: Speed-up of ``--jobs 2`` over ``--jobs 1`` expected on two idle cores.
TARGET_SPEEDUP = 1.6


def write_inputs(folder, count, shape):
    """``count`` phantom stacks as ``case<k>.nii.gz`` and a classifier trained on another one."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        phantom = make_phantom(shape=shape, seed=index)
        image = sitk.GetImageFromArray(phantom.image)
        image.SetSpacing([float(s) for s in phantom.spacing[::-1]])
        sitk.WriteImage(image, str(folder / f"case{index:03d}.nii.gz"), useCompression=True)
    training = make_phantom(shape=shape, seed=10_000)
    session = AnnotationSession(training.image, training.spacing)
    session.update(example_strokes(training.label_map))
    names = [training.class_names[value] for value in sorted(training.class_names)]
    return save_classifier(folder.parent / "classifier.skops", session.pixel_classifier(), names)


def tree_rss(root_pid):
    """Resident memory (bytes) of a process and all its descendants, from /proc."""
    parents, rss = {}, {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as statm:
                rss[int(entry)] = int(statm.read().split()[1]) * page
            parents[int(entry)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack += [child for child, parent in parents.items() if parent == pid]
    return total


def run_apply(classifier, inputs, output, extra):
    """Run ``python -m FetalAnnotateLib apply`` once; (seconds, peak tree memory in bytes, stderr)."""
    command = [sys.executable, "-m", "FetalAnnotateLib", "apply", "--classifier", str(classifier),
               "--output", str(output), str(inputs)] + extra
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "FetalAnnotate"), str(ROOT / "FetalInpaint"),
                                                                os.environ.get("PYTHONPATH", "")]))
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    peak = [0]

    def sample():
        while process.poll() is None:
            if os.path.isdir("/proc"):
                peak[0] = max(peak[0], tree_rss(process.pid))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, errors = process.communicate()
    seconds = time.perf_counter() - started
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} ended with exit code {process.returncode}:\n{errors}")
    return seconds, peak[0], errors


def budget_line(errors):
    """The command's 'memory budget ...' line."""
    return next((line for line in errors.splitlines() if line.startswith("memory budget")), "(no budget line)")


def budget_bytes(errors):
    match = re.search(r"memory budget ([\d.]+) GiB", errors)
    return float(match.group(1)) * 2**30 if match else float("nan")


def same_outputs(first, second):
    """Names of the ``.seg.nrrd`` files whose labels differ (or that are missing) between two folders."""
    import SimpleITK as sitk

    names = sorted({path.name for path in first.glob("*.seg.nrrd")} | {path.name for path in second.glob("*.seg.nrrd")})
    differ = []
    for name in names:
        if not (first / name).exists() or not (second / name).exists():
            differ.append(name)
            continue
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(first / name)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(second / name)))
        if a.shape != b.shape or not np.array_equal(a, b):
            differ.append(name)
    return names, differ


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=40, help="number of generated volumes (default: %(default)s)")
    parser.add_argument("--shape", type=int, nargs=3, default=[22, 320, 320], metavar=("Z", "Y", "X"),
                        help="volume size in voxels (default: 22 320 320)")
    parser.add_argument("--workdir", type=Path,
                        help="folder for the volumes and outputs (default: a temporary folder, removed at the end)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fetalannotate-batch-") as temporary:
        work = args.workdir or Path(temporary)
        started = time.perf_counter()
        classifier = write_inputs(work / "volumes", args.count, tuple(args.shape))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(f"{args.count} volumes of {' x '.join(map(str, args.shape))} voxels and a classifier written in "
              f"{time.perf_counter() - started:.0f} s; {cores} cores")

        runs = {}
        for label, output, extra in (("--jobs 1", "jobs1", ["--jobs", "1"]), ("--jobs 2", "jobs2", ["--jobs", "2"])):
            seconds, peak, errors = run_apply(classifier, work / "volumes", work / output, extra)
            runs[label] = seconds
            print(f"{label}: {seconds:6.1f} s, {60 * args.count / seconds:5.1f} volumes/min, peak memory "
                  f"{peak / 2**30:.2f} GiB of a {budget_bytes(errors) / 2**30:.1f} GiB budget\n"
                  f"    {budget_line(errors)}")
        shard_seconds, shard_peak = 0.0, 0
        for index in (1, 2, 3):
            seconds, peak, _ = run_apply(classifier, work / "volumes", work / "sharded", ["--shard", f"{index}/3"])
            shard_seconds += seconds
            shard_peak = max(shard_peak, peak)
        print(f"3 shards one after the other: {shard_seconds:6.1f} s, {60 * args.count / shard_seconds:5.1f} "
              f"volumes/min, peak memory {shard_peak / 2**30:.2f} GiB")

        speedup = runs["--jobs 1"] / runs["--jobs 2"]
        print(f"speed-up of --jobs 2: {speedup:.2f}x (target >= {TARGET_SPEEDUP}x on 2 idle cores: "
              f"{'met' if speedup >= TARGET_SPEEDUP else 'not met'})")
        failures = 0
        for label, folder in (("--jobs 2", "jobs2"), ("sharded", "sharded")):
            names, differ = same_outputs(work / "jobs1", work / folder)
            failures += bool(differ) or len(names) != args.count
            print(f"{label} outputs equal to --jobs 1: {len(names) - len(differ)} of {len(names)} volumes"
                  + (f"; differ: {', '.join(differ)}" if differ else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
