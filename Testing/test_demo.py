"""The README's main job: the phantom demo writes files that Slicer opens, with a usable result."""

import numpy as np


def test_demo_writes_slicer_files_and_segments_the_phantom(tmp_path):
    import slicerio
    from FetalAnnotateLib.__main__ import main, run_demo

    scores = run_demo(tmp_path, print_fn=lambda line: None)

    segmentation = slicerio.read_segmentation(str(tmp_path / "phantom_auto.seg.nrrd"))
    assert [segment["name"] for segment in segmentation["segments"]] == [
        "background (auto)", "fetus (auto)", "placenta (auto)"]
    strokes = slicerio.read_segmentation(str(tmp_path / "phantom_strokes.seg.nrrd"))
    assert [segment["name"] for segment in strokes["segments"]] == ["background", "fetus", "placenta"]
    assert np.count_nonzero(strokes["voxels"]) > 0
    assert scores["fetus"] > 0.9
    for name in ("phantom.nrrd", "phantom_fetus_probability.nrrd", "phantom_classifier.skops"):
        assert (tmp_path / name).stat().st_size > 0

    # The saved classifier segments another volume through the batch command.
    assert main(["apply", "--classifier", str(tmp_path / "phantom_classifier.skops"),
                 str(tmp_path / "phantom.nrrd"), "--output", str(tmp_path / "batch")]) == 0
    applied = slicerio.read_segmentation(str(tmp_path / "batch" / "phantom.seg.nrrd"))
    assert [segment["name"] for segment in applied["segments"]] == ["background", "fetus", "placenta"]
