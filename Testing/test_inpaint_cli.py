"""``python -m FetalInpaintLib``: help on every option, messages instead of tracebacks, exit codes (no torch needed)."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from FetalInpaintLib.__main__ import build_parser, main, run_command

LIBRARY_PARENT = Path(__file__).resolve().parents[1] / "FetalInpaint"


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_command_and_option_has_help():
    commands = _subparsers(build_parser())
    assert set(commands) == {"train", "evaluate", "export"}
    for name, parser in commands.items():
        undocumented = [action.dest for action in parser._actions if not action.help or action.help == argparse.SUPPRESS]
        assert undocumented == [], f"{name}: options without help: {undocumented}"


def test_module_runs_and_usage_errors_exit_with_2():
    done = subprocess.run([sys.executable, "-m", "FetalInpaintLib", "train", "--help"], cwd=LIBRARY_PARENT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--patches-per-epoch" in done.stdout
    for argv in ([], ["fit"], ["train", "--volumes", "a.nrrd"], ["train", "--out", "x", "--epochs", "many"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2


def test_user_errors_are_one_message_and_exit_code_2_as_fetalannotate_apply(tmp_path, capsys):
    missing = str(tmp_path / "missing.nrrd")
    assert main(["train", "--out", str(tmp_path / "run"), "--volumes", missing]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: volume file") and "not found" in error and "Traceback" not in error
    assert main(["train", "--out", str(tmp_path / "run"), "--volumes", missing, "--verbose"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "run"), "--volumes", missing, "--strength", "2"]) == 2
    assert "strength must be in (0, 1)" in capsys.readouterr().err


def test_interrupted_command_exits_with_130(capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    assert run_command(interrupted, argparse.Namespace(verbose=False)) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_export_never_writes_over_its_input_volume(tmp_path, capsys):
    volume = tmp_path / "volume.nrrd"
    volume.write_bytes(b"the user's volume")
    assert main(["export", "--model", str(tmp_path / "model.pt"), "--volume", str(volume), "--output",
                 str(tmp_path / "." / "volume.nrrd")]) == 2
    assert "is the input volume" in capsys.readouterr().err
    assert volume.read_bytes() == b"the user's volume"
