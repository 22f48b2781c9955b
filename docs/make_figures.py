"""Render the user guide's figures (docs/images/) from real runs on the development data.

    .venv/bin/python docs/make_figures.py            # needs ../shared/data (the real fetal MRI stacks)

It needs matplotlib, which the test install (``pip install ".[torch,test]"``) has and the plain
``pip install .`` does not.

The robot user of the benchmark (Testing/benchmarks/robot_user.py) paints round-0 strokes on one
slice and one correction stroke per round; the engine that the module and the "Random forest"
effect run (FetalAnnotateLib.AnnotationSession, features computed once) segments after each
round. Figures: stroke and result overlays per round on a real stack, Dice per round for the
three real stacks, and a probability map.
"""

import csv
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
IMAGES = ROOT / "docs" / "images"
sys.path[:0] = [str(ROOT / "FetalAnnotate"), str(ROOT / "Testing" / "benchmarks")]

from FetalAnnotateLib import AnnotationSession  # noqa: E402
from robot_benchmark import load_case  # noqa: E402
from robot_user import acquisition_axis, add_correction_stroke, dice, initial_strokes  # noqa: E402

DATASET = "fetal_mri_mialsrtk_sub01"
ROUNDS = 6
SHOWN_ROUNDS = (0, 2, 6)
STROKE_COLORS = {1: (0.34, 0.71, 0.91), 2: (0.0, 0.75, 0.45)}  # background blue, fetal brain green
RESULT_COLOR = (0.95, 0.62, 0.0)


def run_rounds(image, target, spacing):
    """Strokes, probability of the target and Dice after each round (round 0 = first strokes)."""
    axis = acquisition_axis(spacing)
    start = time.perf_counter()
    session = AnnotationSession(image, spacing)
    feature_seconds = time.perf_counter() - start
    strokes = initial_strokes(target, axis)
    history = []
    for round_index in range(ROUNDS + 1):
        start = time.perf_counter()
        result = session.update(strokes)
        seconds = time.perf_counter() - start
        prediction = result.labels == 2
        history.append({"strokes": strokes.copy(), "prediction": prediction, "dice": dice(prediction, target),
                        "probability": result.probabilities[list(result.classes).index(2)], "seconds": seconds})
        if round_index < ROUNDS and not add_correction_stroke(strokes, target, prediction, axis):
            break
    return history, feature_seconds


def crop_box(mask, margin=25):
    """In-plane bounding box (y, x slices) of a 2D mask with a margin."""
    ys, xs = np.nonzero(mask)
    return (slice(max(ys.min() - margin, 0), ys.max() + margin), slice(max(xs.min() - margin, 0), xs.max() + margin))


def draw_slice(axes, image2d, strokes2d, prediction2d, target2d, title):
    """Intensity slice with the result filled, the expert contour and the strokes on top."""
    from matplotlib.colors import ListedColormap

    low, high = np.percentile(image2d, [1, 99.5])
    axes.imshow(image2d, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
    axes.imshow(np.ma.masked_where(~prediction2d, prediction2d), cmap=ListedColormap([RESULT_COLOR]), alpha=0.45,
                interpolation="nearest")
    axes.contour(target2d, levels=[0.5], colors=["white"], linewidths=0.8, linestyles="dashed")
    for value, color in STROKE_COLORS.items():
        painted = strokes2d == value
        axes.imshow(np.ma.masked_where(~painted, painted), cmap=ListedColormap([color]), interpolation="nearest")
    axes.set_title(title, fontsize=9)
    axes.set_axis_off()


def figure_rounds(image, target, history, path):
    import matplotlib.pyplot as plt

    index = int(np.argmax(target.sum(axis=(1, 2))))
    box = crop_box(target[index])
    shown = [r for r in SHOWN_ROUNDS if r < len(history)]
    figure, axes = plt.subplots(1, len(shown), figsize=(3.0 * len(shown), 3.2), dpi=110)
    for ax, round_index in zip(np.atleast_1d(axes), shown):
        entry = history[round_index]
        painted_slices = int(np.any(entry["strokes"] > 0, axis=(1, 2)).sum())
        draw_slice(ax, image[index][box], entry["strokes"][index][box], entry["prediction"][index][box],
                   target[index][box], f"round {round_index}: Dice {entry['dice']:.2f}\n"
                                       f"strokes on {painted_slices} slice(s)")
    figure.suptitle("Fetal brain in a real HASTE stack (slice shown: largest brain area)", fontsize=9)
    figure.text(0.5, 0.01, "green: 'fetal brain' strokes, blue: 'background' strokes, orange: "
                "'fetal brain (auto)', dashed: expert mask", ha="center", fontsize=7)
    figure.tight_layout(rect=(0, 0.04, 1, 0.95))
    figure.savefig(path)
    plt.close(figure)


def figure_probability(image, target, history, path):
    import matplotlib.pyplot as plt

    index = int(np.argmax(target.sum(axis=(1, 2))))
    box = crop_box(target[index])
    figure, axes = plt.subplots(1, 2, figsize=(6.0, 3.1), dpi=110)
    low, high = np.percentile(image[index], [1, 99.5])
    axes[0].imshow(image[index][box], cmap="gray", vmin=low, vmax=high)
    axes[0].set_title("source slice", fontsize=9)
    shown = axes[1].imshow(history[0]["probability"][index][box], cmap="inferno", vmin=0, vmax=1)
    axes[1].contour(target[index][box], levels=[0.5], colors=["white"], linewidths=0.8, linestyles="dashed")
    axes[1].set_title("'fetal brain probability' volume, round 0", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    figure.colorbar(shown, ax=axes[1], fraction=0.046)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def figure_dice(curves, path):
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(4.6, 3.0), dpi=110)
    for name, values in curves.items():
        axes.plot(range(len(values)), values, marker="o", markersize=3, label=name)
    axes.set_xlabel("round (0 = strokes on one slice; then one correction stroke per round)", fontsize=8)
    axes.set_ylabel("Dice of 'fetal brain (auto)'", fontsize=8)
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    axes.tick_params(labelsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('docs/make_figures.py needs matplotlib: pip install matplotlib '
                         '(the test install, pip install ".[torch,test]", has it)') from None

    matplotlib.use("Agg")
    if not (DATA / "cases.csv").exists():
        raise SystemExit(f"development data not found at {DATA}")
    IMAGES.mkdir(parents=True, exist_ok=True)
    with open(DATA / "cases.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["dataset"] == DATASET]
    curves = {}
    for row in rows:
        image, target, spacing, _ = load_case(row, DATA)
        history, feature_seconds = run_rounds(image, target, spacing)
        curves[row["case"]] = [entry["dice"] for entry in history]
        print(f"{row['case']}: features {feature_seconds:.1f} s, rounds "
              + ", ".join(f"{entry['dice']:.3f} ({entry['seconds']:.1f} s)" for entry in history))
        if row["case"] == "sub-01_run-1":
            figure_rounds(image, target, history, IMAGES / "rounds_sub-01_run-1.png")
            figure_probability(image, target, history, IMAGES / "probability_sub-01_run-1.png")
    figure_dice(curves, IMAGES / "dice_per_round.png")
    for png in sorted(IMAGES.glob("*.png")):
        print(f"{png.relative_to(ROOT)}: {png.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
