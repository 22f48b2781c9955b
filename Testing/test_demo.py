"""The README's main job: the phantom demo writes files that Slicer opens, with a usable result."""

import numpy as np
import pytest


def test_demo_writes_slicer_files_and_segments_the_phantom(tmp_path):
    import slicerio
    from FetalAnnotateLib.__main__ import demo_file_names, main, run_demo

    scores = run_demo(tmp_path, print_fn=lambda line: None)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        demo_file_names(["background", "fetus", "placenta"]))  # the files an existing folder is checked for

    segmentation = slicerio.read_segmentation(str(tmp_path / "phantom_auto.seg.nrrd"))
    assert [segment["name"] for segment in segmentation["segments"]] == [
        "background (auto)", "fetus (auto)", "placenta (auto)"]
    strokes = slicerio.read_segmentation(str(tmp_path / "phantom_strokes.seg.nrrd"))
    assert [segment["name"] for segment in strokes["segments"]] == ["background", "fetus", "placenta"]
    assert np.count_nonzero(strokes["voxels"]) > 0
    # The placenta is thin and curved: distance to its strokes alone made it 2.6 times too large (Dice 0.46).
    assert scores["fetus"] > 0.95 and scores["background"] > 0.95 and scores["placenta"] > 0.9
    for name in ("phantom.nrrd", "phantom_fetus_probability.nrrd", "phantom_classifier.skops"):
        assert (tmp_path / name).stat().st_size > 0

    # The saved classifier segments the demo folder's volume (and only it) through the batch command.
    assert main(["apply", "--classifier", str(tmp_path / "phantom_classifier.skops"), str(tmp_path),
                 "--output", str(tmp_path)]) == 0
    applied = slicerio.read_segmentation(str(tmp_path / "phantom.seg.nrrd"))
    assert [segment["name"] for segment in applied["segments"]] == ["background", "fetus", "placenta"]
    assert sorted(path.name for path in tmp_path.glob("*.seg.nrrd")) == [
        "phantom.seg.nrrd", "phantom_auto.seg.nrrd", "phantom_strokes.seg.nrrd"]


def test_help_names_the_program_as_typed_and_every_option_has_help(monkeypatch, capsys):
    import argparse
    import sys

    from FetalAnnotateLib.__main__ import build_parser, main

    for script, prog in (("/home/lab/.venv/bin/fetalannotate", "fetalannotate"),
                         ("/repo/FetalAnnotate/FetalAnnotateLib/__main__.py", "python -m FetalAnnotateLib")):
        monkeypatch.setattr(sys, "argv", [script])
        with pytest.raises(SystemExit) as shown:
            main(["apply", "--help"])
        assert shown.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: {prog} apply ")

    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from parsers(child)

    every = list(parsers(build_parser("fetalannotate")))
    assert {parser.prog for parser in every} >= {"fetalannotate demo", "fetalannotate apply",
                                                 "fetalannotate inpaint train", "fetalannotate inpaint export"}
    undocumented = [f"{parser.prog} {action.dest}" for parser in every for action in parser._actions
                    if not action.help and not isinstance(action, argparse._SubParsersAction)]
    assert undocumented == []


def test_demo_into_a_file_is_a_message_not_a_traceback(tmp_path, capsys):
    from FetalAnnotateLib.__main__ import main

    (tmp_path / "README.md").write_text("# my notes\n")

    assert main(["demo", "--output", str(tmp_path / "README.md")]) == 2

    error = capsys.readouterr().err
    assert "README.md is a file; give a folder for the demo files" in error and "Traceback" not in error
    assert (tmp_path / "README.md").read_text() == "# my notes\n"


def test_demo_refuses_to_replace_files_of_the_folder_unless_told_to(tmp_path, capsys):
    from FetalAnnotateLib.__main__ import main

    mine = {"phantom_strokes.seg.nrrd": b"strokes I corrected", "phantom_classifier.skops": b"my classifier"}
    for name, content in mine.items():
        (tmp_path / name).write_bytes(content)

    assert main(["demo", "--output", str(tmp_path)]) == 2

    error = capsys.readouterr().err
    assert f"{tmp_path} already holds phantom_strokes.seg.nrrd, phantom_classifier.skops; give --overwrite" in error
    assert "Traceback" not in error
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(mine)  # refused before any work
    assert all((tmp_path / name).read_bytes() == content for name, content in mine.items())

    assert main(["demo", "--output", str(tmp_path), "--overwrite"]) == 0
    assert (tmp_path / "phantom.nrrd").stat().st_size > 0
    assert all((tmp_path / name).read_bytes() != content for name, content in mine.items())
