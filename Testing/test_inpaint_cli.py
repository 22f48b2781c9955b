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


def _write_image(path, array, spacing):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def test_truncated_or_corrupt_volume_files_are_refused_before_training(tmp_path, capsys):
    import numpy as np

    array = np.random.default_rng(0).normal(100, 20, (20, 64, 64)).astype(np.float32)  # more than the header read
    complete = _write_image(tmp_path / "complete.nii.gz", array, (1.0, 1.0, 3.0)).read_bytes()
    raw = _write_image(tmp_path / "complete.nii", array, (1.0, 1.0, 3.0)).read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(complete[: len(complete) * 9 // 10])  # SimpleITK reads it zero-padded
    (tmp_path / "cut.nii").write_bytes(raw[:-100])
    flipped = bytearray(complete)
    flipped[-6] ^= 0x10  # in the CRC of the gzip stream: SimpleITK reads the file without a word
    (tmp_path / "flipped.nii.gz").write_bytes(bytes(flipped))

    for name, message in (("cut.nii.gz", "is truncated: its compressed data ends early"),
                          ("cut.nii", f"is truncated: it holds {len(raw) - 100} of the {len(raw)} bytes"),
                          ("flipped.nii.gz", "is corrupt")):
        assert main(["train", "--out", str(tmp_path / "run"), "--volumes", str(tmp_path / name)]) == 2
        error = capsys.readouterr().err
        assert f"{tmp_path / name} {message}" in error and "copy it again from its source" in error, error
    assert not (tmp_path / "run").exists()


def test_integer_nifti_scaled_by_its_header_is_not_called_truncated(tmp_path):
    import numpy as np
    from conftest import write_scaled_nifti

    from FetalInpaintLib.errors import InvalidVolumeError
    from FetalInpaintLib.train import check_volume_file

    stored = np.random.default_rng(0).integers(0, 100, (4, 32, 32)).astype(np.uint8)
    for name in ("scaled.nii", "scaled.nii.gz"):
        check_volume_file(write_scaled_nifti(tmp_path / name, stored))
    (tmp_path / "cut.nii").write_bytes((tmp_path / "scaled.nii").read_bytes()[:-100])
    with pytest.raises(InvalidVolumeError, match="truncated"):
        check_volume_file(tmp_path / "cut.nii")


def test_a_2d_image_is_a_volume_of_one_slice(tmp_path):
    import numpy as np

    from FetalInpaintLib.train import read_volume

    image = np.random.default_rng(0).integers(0, 255, (30, 50), dtype=np.uint8)
    for name in ("frame.png", "frame.nrrd"):
        array, spacing = read_volume(_write_image(tmp_path / name, image, (0.25, 0.5)))
        assert array.shape == (1, 30, 50) and array.dtype == np.float32 and np.array_equal(array[0], image)
        assert spacing == pytest.approx((1.0, 0.5, 0.25))  # the slice axis: 1 mm, as in FetalAnnotate


def test_an_earlier_training_is_replaced_only_when_told(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(b"the user's model")
    (run / "history.json").write_text("[]")
    missing = str(tmp_path / "missing.nrrd")  # read after the check: its error means the check let the run start

    assert main(["train", "--out", str(run), "--volumes", missing]) == 2
    assert ("already holds a training (model.pt, history.json): give --resume to continue it, --overwrite to "
            "replace it, or another --out.") in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--volumes", missing, "--resume"]) == 2
    assert "without resume.pt, so --resume cannot continue it: give --overwrite" in capsys.readouterr().err
    assert (run / "model.pt").read_bytes() == b"the user's model"
    with pytest.raises(SystemExit) as exited:
        main(["train", "--out", str(run), "--volumes", missing, "--resume", "--overwrite"])
    assert exited.value.code == 2 and "not allowed with argument --resume" in capsys.readouterr().err

    assert main(["train", "--out", str(run), "--volumes", missing, "--overwrite"]) == 2
    assert "volume file" in capsys.readouterr().err
    (run / "resume.pt").write_bytes(b"a resume point")
    assert main(["train", "--out", str(run), "--volumes", missing, "--resume"]) == 2
    assert "volume file" in capsys.readouterr().err
    assert (run / "model.pt").read_bytes() == b"the user's model"
