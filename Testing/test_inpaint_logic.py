"""FetalInpaintLogic against a real MRML scene (slicer-core): geometry, background training, errors."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import vtk

from FetalInpaintLib.errors import ArchitectureMismatchError, CheckpointError, FetalInpaintError, InvalidVolumeError
from FetalInpaintLogic import FetalInpaintLogic, TrainingProcess, readProgress

# A model and data small enough that an epoch takes a fraction of a second on one CPU thread.
TINY_MODEL = ["--base-channels", "4", "--depth", "2", "--batch-size", "16", "--stride", "16", "--log-every", "1"]
TINY_TRAINING = dict(patchSize=32, threads=1, extraArguments=TINY_MODEL)


@pytest.fixture(scope="module")
def tinyCheckpoint(tmp_path_factory):
    """model.pt (+ model.json) of a tiny model trained in-process for one epoch on two phantoms."""
    from FetalInpaintLib.training import TrainConfig, train

    output = tmp_path_factory.mktemp("tiny-model")
    volumes = {f"phantom{seed}": (_phantomVolume(seed=seed), (4.0, 1.0, 1.0)) for seed in range(2)}
    config = TrainConfig(epochs=1, batch_size=16, patch_size=32, stride=16, base_channels=4, depth=2)
    return Path(train(volumes, config, output).checkpoint_path)


def _obliqueVolume(scene, array, name="source", spacing=(0.8, 0.9, 3.5), origin=(-12.0, 30.5, 7.25)):
    """A scalar volume with non-identity (rotated and flipped) axis directions."""
    import slicer

    node = slicer.util.addVolumeFromArray(array, name=name)
    node.SetSpacing(*spacing)  # (i, j, k) = (x, y, z)
    node.SetOrigin(*origin)
    angle = np.deg2rad(30.0)
    directions = np.array([
        [np.cos(angle), -np.sin(angle), 0.0],
        [np.sin(angle), np.cos(angle), 0.0],
        [0.0, 0.0, -1.0],
    ])
    node.SetIJKToRASDirections(*directions.ravel())
    return node


def _geometry(node):
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _phantomVolume(shape=(6, 48, 48), seed=0):
    """Bright ellipse with texture on a dark background: something worth inpainting."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]].astype(np.float32)
    ellipse = ((y - shape[1] / 2) / (shape[1] * 0.35)) ** 2 + ((x - shape[2] / 2) / (shape[2] * 0.3)) ** 2 < 1
    image = 100.0 * ellipse + 20.0 * np.sin(x / 3.0) * np.cos(y / 4.0) + rng.normal(0, 3, shape)
    return image.astype(np.float32)


# ----------------------------------------------------------------------------- volumes and geometry


def test_volume_data_has_voxels_spacing_and_matrix(mrml_scene):
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    node = _obliqueVolume(mrml_scene, array)

    data = FetalInpaintLogic.volumeData(node)

    assert data.array.dtype == np.float32 and data.array.shape == (4, 5, 6)
    np.testing.assert_array_equal(data.array, array)
    assert data.spacing == pytest.approx((3.5, 0.9, 0.8))  # z, y, x
    np.testing.assert_allclose(data.ijkToRAS, _geometry(node))
    data.array[0, 0, 0] = -1  # a copy: the node keeps its voxels
    import slicer

    assert slicer.util.arrayFromVolume(node)[0, 0, 0] == 0


@pytest.mark.parametrize("asVectorVolume", [False, True])
def test_exported_features_keep_the_source_geometry(mrml_scene, asVectorVolume):
    import slicer

    source = _obliqueVolume(mrml_scene, np.zeros((5, 7, 9), np.float32))
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    source.SetAndObserveTransformNodeID(transform.GetID())
    features = np.random.default_rng(0).normal(size=(3, 5, 7, 9)).astype(np.float32)

    nodes = FetalInpaintLogic.featuresToVolumeNodes(features, source, asVectorVolume=asVectorVolume,
                                                    checkpointPath="/models/best.pt")

    assert len(nodes) == (1 if asVectorVolume else 3)
    expectedClass = "vtkMRMLVectorVolumeNode" if asVectorVolume else "vtkMRMLScalarVolumeNode"
    for node in nodes:
        assert node.GetClassName() == expectedClass
        assert node.GetScene() is mrml_scene
        np.testing.assert_allclose(_geometry(node), _geometry(source), atol=1e-9)
        assert node.GetSpacing() == pytest.approx(source.GetSpacing())
        assert node.GetOrigin() == pytest.approx(source.GetOrigin())
        assert node.GetTransformNodeID() == transform.GetID()
        assert node.GetNodeReference("FetalInpaintSourceVolume") is source
        assert node.GetDisplayNode() is not None
    # Same voxels back, channel for channel, whichever node type holds them.
    np.testing.assert_array_equal(FetalInpaintLogic.featureArrayFromNodes(nodes), features)
    assert slicer.util.arrayFromVolume(nodes[0]).shape == ((5, 7, 9, 3) if asVectorVolume else (5, 7, 9))


def test_features_with_another_grid_are_rejected(mrml_scene):
    source = _obliqueVolume(mrml_scene, np.zeros((5, 7, 9), np.float32))
    with pytest.raises(FetalInpaintError, match=r"\(C, 5, 7, 9\)"):
        FetalInpaintLogic.featuresToVolumeNodes(np.zeros((2, 5, 7, 8), np.float32), source)


# ----------------------------------------------------------------------------- trained model


def test_model_features_are_extra_channels_on_the_source_grid(mrml_scene, tinyCheckpoint):
    # Slice sides that are not multiples of the 4x downsampling: the maps must still fit the grid.
    source = _obliqueVolume(mrml_scene, _phantomVolume(shape=(6, 42, 45), seed=3), spacing=(1.0, 1.0, 4.0))
    logic = FetalInpaintLogic()

    channels = logic.computeFeatures(source, tinyCheckpoint, pcaComponents=3)
    assert channels.shape == (3, 6, 42, 45) and channels.dtype == np.float32
    assert np.isfinite(channels).all() and channels.std() > 0
    assert logic.computeFeatures(source, tinyCheckpoint).shape == (16, 6, 42, 45)  # 4 * 2**2 bottleneck channels

    nodes = logic.exportFeatures(source, tinyCheckpoint, pcaComponents=3, asVectorVolume=True)
    assert len(nodes) == 1 and nodes[0].IsA("vtkMRMLVectorVolumeNode")
    np.testing.assert_allclose(_geometry(nodes[0]), _geometry(source), atol=1e-9)
    np.testing.assert_allclose(FetalInpaintLogic.featureArrayFromNodes(nodes), channels, rtol=1e-4, atol=1e-5)
    with pytest.raises(FetalInpaintError, match="pca_components must be between 1 and 16"):
        logic.computeFeatures(source, tinyCheckpoint, pcaComponents=40)


def test_evaluate_gives_finite_psnr_for_the_model_and_the_baselines(mrml_scene, tinyCheckpoint):
    import slicer

    heldOut = _obliqueVolume(mrml_scene, _phantomVolume(seed=7), name="held out", spacing=(1.0, 1.0, 4.0))
    logic = FetalInpaintLogic()
    table = logic.evaluate(tinyCheckpoint, heldOut, corruptors=("shapes", "holes"), seeds=(0, 1), maxPatches=6)

    assert [table.GetCellText(row, 1) for row in range(table.GetNumberOfRows())] == ["model", "mean", "biharmonic"] * 2
    assert {table.GetCellText(row, 0) for row in range(table.GetNumberOfRows())} == {"shapes", "holes"}
    for column in ("PSNR hidden (dB)", "PSNR whole (dB)"):
        values = slicer.util.arrayFromTableColumn(table, column)
        assert np.isfinite(values).all() and (values > 0).all()
    assert (slicer.util.arrayFromTableColumn(table, "PSNR hidden (dB) sd") >= 0).all()
    # Most pixels are copied through, so the whole image always scores higher than the hidden region.
    assert (slicer.util.arrayFromTableColumn(table, "PSNR whole (dB)")
            > slicer.util.arrayFromTableColumn(table, "PSNR hidden (dB)")).all()
    assert logic.evaluate(tinyCheckpoint, [heldOut], corruptors=("toss",), seeds=(0,), maxPatches=2,
                          tableNode=table) is table
    assert table.GetNumberOfRows() == 3
    mrml_scene.RemoveNode(table)  # the user deleted the table: the next evaluation gets a new one in the scene
    again = logic.evaluate(tinyCheckpoint, [heldOut], corruptors=("toss",), seeds=(0,), maxPatches=2, tableNode=table)
    assert again is not table and again.GetScene() is mrml_scene and again.GetNumberOfRows() == 3


# ----------------------------------------------------------------------------- bad input


def test_no_volume_is_a_clear_error(mrml_scene):
    with pytest.raises(InvalidVolumeError, match="no volume selected"):
        FetalInpaintLogic.volumeData(None)
    with pytest.raises(InvalidVolumeError, match="no training volume"):
        FetalInpaintLogic().startTraining([], "/tmp/unused")


def test_nan_voxels_are_a_clear_error(mrml_scene):
    array = np.ones((3, 8, 8), np.float32)
    array[1, 2, 3] = np.nan
    array[2, 2, 3] = np.inf
    node = _obliqueVolume(mrml_scene, array, name="withNaN")
    with pytest.raises(InvalidVolumeError, match="'withNaN' holds 2 NaN or infinite voxels"):
        FetalInpaintLogic.volumeData(node)


def test_label_map_and_empty_volume_are_rejected(mrml_scene):
    import slicer

    labels = slicer.util.addVolumeFromArray(np.ones((3, 8, 8), np.uint8), nodeClassName="vtkMRMLLabelMapVolumeNode")
    with pytest.raises(InvalidVolumeError, match="label map"):
        FetalInpaintLogic.volumeData(labels)
    empty = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InvalidVolumeError, match="'empty' holds no voxels"):
        FetalInpaintLogic.volumeData(empty)


def test_volume_smaller_than_a_patch_is_a_clear_error(mrml_scene, tmp_path):
    node = _obliqueVolume(mrml_scene, np.ones((4, 20, 30), np.float32), name="tiny", spacing=(1.0, 1.0, 4.0))
    with pytest.raises(InvalidVolumeError, match=r"'tiny' are 20 x 30 voxels, smaller than the 32 x 32 patch"):
        FetalInpaintLogic().startTraining([node], tmp_path, patchSize=32)
    assert not any(tmp_path.iterdir())  # nothing written, no process started


def test_earlier_training_is_neither_resumed_nor_replaced_by_accident(mrml_scene, tmp_path):
    logic = FetalInpaintLogic()
    volumes = _trainingVolumes(mrml_scene, 1)
    with pytest.raises(FetalInpaintError, match="nothing to resume"):
        logic.startTraining(volumes, tmp_path, resume=True, **TINY_TRAINING)
    (tmp_path / "model.pt").write_bytes(b"earlier model")
    (tmp_path / "history.json").write_text("[]")
    assert logic.hasTrainingOutputs(tmp_path)
    with pytest.raises(FetalInpaintError, match="already holds a training"):
        logic.startTraining(volumes, tmp_path, **TINY_TRAINING)
    assert (tmp_path / "model.pt").read_bytes() == b"earlier model"


def test_missing_corrupt_and_foreign_checkpoints_are_clear_errors(tinyCheckpoint, tmp_path):
    import shutil

    logic = FetalInpaintLogic()
    with pytest.raises(CheckpointError, match="no checkpoint selected"):
        logic.loadModel("")
    with pytest.raises(CheckpointError, match="not found"):
        logic.loadModel(tmp_path / "missing.pt")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tinyCheckpoint.parent, corrupt)
    (corrupt / "model.pt").write_bytes(b"this is not a torch file")
    with pytest.raises(CheckpointError, match="corrupt"):
        logic.loadModel(corrupt / "model.pt")

    foreign = tmp_path / "foreign"
    shutil.copytree(tinyCheckpoint.parent, foreign)
    metadata = json.loads((foreign / "model.json").read_text())
    metadata["architecture"]["base_channels"] = 8  # weights of a 4-channel model, metadata of an 8-channel one
    (foreign / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(ArchitectureMismatchError, match="do not fit"):
        logic.loadModel(foreign)

    model, metadata = logic.loadModel(tinyCheckpoint.parent)  # a folder means its model.pt
    assert metadata["architecture"]["base_channels"] == 4 and not model.training
    assert logic.loadModel(tinyCheckpoint)[0] is model  # cached while the file is unchanged


# ----------------------------------------------------------------------------- progress and plot


def test_read_progress_skips_a_partial_last_line(tmp_path):
    path = tmp_path / "progress.jsonl"
    assert readProgress(path) == ([], 0)
    path.write_text(json.dumps({"epoch": 1, "loss": 0.5}) + "\n" + '{"epoch": 2, "lo')
    records, offset = readProgress(path)
    assert records == [{"epoch": 1, "loss": 0.5}]
    with open(path, "a") as handle:
        handle.write('ss": 0.25}\n')
    more, offset = readProgress(path, offset)
    assert more == [{"epoch": 2, "loss": 0.25}]
    assert readProgress(path, offset) == ([], offset)
    with open(path, "ab") as handle:  # a line that is not UTF-8 is skipped, not read again and again
        handle.write(b"caf\xe9 not json\n" + json.dumps({"epoch": 3}).encode() + b"\n")
    assert readProgress(path, offset)[0] == [{"epoch": 3}]


def test_loss_plot_is_a_chart_with_train_and_validation_series(mrml_scene, tmp_path):
    import slicer

    run = TrainingProcess(process=None, command=[], outputDirectory=tmp_path, epochs=2, startTime=0.0)
    run.records = [{"epoch": 0, "step": 1, "loss": 0.2}, {"epoch": 0, "step": 2, "loss": 0.1}]
    chart = FetalInpaintLogic.updateLossPlot(run, scene=mrml_scene)
    # An epoch ends: history.json gets its validation loss (NaN epochs have no validation volume).
    (tmp_path / "history.json").write_text(json.dumps([{"epoch": 0, "step": 2, "loss": 0.15, "val_loss": 0.12}]))
    run.records.append({"epoch": 1, "step": 3, "loss": 0.08})
    assert FetalInpaintLogic.updateLossPlot(run, chartNode=chart) is chart

    assert chart.GetNumberOfPlotSeriesNodes() == 2
    tables = {chart.GetNthPlotSeriesNode(i).GetYColumnName(): chart.GetNthPlotSeriesNode(i).GetTableNode()
              for i in range(2)}
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(tables["loss"], "loss"), [0.2, 0.1, 0.08])
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(tables["loss"], "step"), [1, 2, 3])
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(tables["val_loss"], "val_loss"), [0.12])
    run.records.append({"epoch": 0, "step": 2, "loss": 0.05})  # a resumed run redoes step 2
    FetalInpaintLogic.updateLossPlot(run, chartNode=chart)
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(tables["loss"], "loss"), [0.2, 0.05, 0.08])

    # The user deletes a table, then the whole chart, while the training runs: both come back.
    mrml_scene.RemoveNode(tables["loss"])
    tableCount = mrml_scene.GetNumberOfNodesByClass("vtkMRMLTableNode")
    for _ in range(2):
        assert FetalInpaintLogic.updateLossPlot(run, chartNode=chart) is chart
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == tableCount + 1
    series = {chart.GetNthPlotSeriesNode(i).GetYColumnName(): chart.GetNthPlotSeriesNode(i) for i in range(2)}
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(series["loss"].GetTableNode(), "loss"),
                               [0.2, 0.05, 0.08])
    mrml_scene.RemoveNode(chart)
    replacement = FetalInpaintLogic.updateLossPlot(run, chartNode=chart)
    assert replacement is not chart and replacement.GetScene() is mrml_scene
    assert replacement.GetNumberOfPlotSeriesNodes() == 2


# ----------------------------------------------------------------------------- background training


def _trainingVolumes(scene, count=3):
    """Thick-slice (4 mm) oblique volumes whose 48 x 48 slices give 32 x 32 patches."""
    return [_obliqueVolume(scene, _phantomVolume(seed=seed), name=f"stack {seed}", spacing=(1.0, 1.0, 4.0))
            for seed in range(count)]


def _waitFor(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_background_training_progress_stop_and_resume(mrml_scene, tmp_path):
    logic = FetalInpaintLogic()
    volumes = _trainingVolumes(mrml_scene)
    output = tmp_path / "run"
    run = logic.startTraining(volumes, output, epochs=500, **TINY_TRAINING)
    assert run.process.poll() is None  # returned at once: the training runs in the background
    assert len(list((output / "volumes").glob("*.nrrd"))) == 3

    _waitFor(lambda: (output / "resume.pt").exists() or run.process.poll() is not None, 120, "the first epoch")
    status = logic.pollTraining(run)
    assert status.running, (output / "training.log").read_text()
    assert status.message.startswith("epoch ") and "/500" in status.message and "ETA" in status.message
    logic.requestStop(run)
    logic.waitForTraining(run, timeout=30)
    status = logic.pollTraining(run)
    assert status.stopped and not status.running and status.outcome == "stopped" and "tick Resume" in status.message
    completed = len(json.loads((output / "history.json").read_text()))
    assert 1 <= completed < 500
    losses = [r for r in run.records if "loss" in r]
    assert losses and all(np.isfinite(r["loss"]) and r["eta_s"] >= 0 for r in losses)

    resumed = logic.startTraining(volumes, output, epochs=completed + 1, resume=True, **TINY_TRAINING)
    assert resumed.earlierRecords == len(run.records)  # the earlier curve stays in the plot
    assert logic.waitForTraining(resumed, timeout=120) == 0, (output / "training.log").read_text()
    status = logic.pollTraining(resumed)
    assert status.returnCode == 0 and status.fraction == 1.0
    assert status.message.startswith(f"Finished. epoch {completed + 1}/{completed + 1}")
    history = json.loads((output / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(completed + 1))  # continued, not restarted
    newLosses = [r for r in resumed.records[resumed.earlierRecords:] if "loss" in r]
    assert newLosses and min(r["epoch"] for r in newLosses) == completed
    assert logic.findCheckpoint(output) == output / "model.pt"
    chart = logic.updateLossPlot(resumed, scene=mrml_scene)
    assert chart.GetNthPlotSeriesNode(1).GetTableNode().GetNumberOfRows() == completed + 1  # validation per epoch


def test_failed_training_reports_the_error(mrml_scene, tmp_path):
    logic = FetalInpaintLogic()
    (tmp_path / "model.pt").write_bytes(b"earlier model")
    run = logic.startTraining(_trainingVolumes(mrml_scene, 1), tmp_path, corruptorStrength=1.5, overwrite=True,
                              **TINY_TRAINING)
    assert not (tmp_path / "model.pt").exists()  # the earlier run is gone, so it cannot be mistaken for this one
    logic.waitForTraining(run, timeout=120)
    status = logic.pollTraining(run)
    assert status.returnCode not in (None, 0) and not status.stopped
    assert "Training failed" in status.message and "strength must be in (0, 1)" in status.message


def test_importing_the_logic_does_not_import_torch():
    # Slicer loads the module before PyTorch is installed: torch may only be imported on use.
    import subprocess
    import sys

    code = "import sys, FetalInpaintLogic; assert 'torch' not in sys.modules, 'torch imported'"
    moduleDir = Path(__file__).resolve().parents[1] / "FetalInpaint"
    subprocess.run([sys.executable, "-c", code], cwd=moduleDir, check=True, timeout=120)


def test_training_interpreter_is_python_slicer_next_to_the_slicer_application(tmp_path, monkeypatch):
    import sys

    from FetalInpaintLogic import defaultPythonExecutable

    monkeypatch.setattr(sys, "executable", str(tmp_path / "python3"))
    assert defaultPythonExecutable() == str(tmp_path / "python3")  # PythonSlicer or any plain Python
    pythonSlicer = tmp_path / "PythonSlicer"
    pythonSlicer.touch()
    monkeypatch.setattr(sys, "executable", str(tmp_path / "SlicerApp-real"))  # the GUI application itself
    assert defaultPythonExecutable() == str(pythonSlicer)
    pythonSlicer.unlink()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FetalInpaintError, match="cannot find the PythonSlicer interpreter"):
        defaultPythonExecutable()


def test_parameter_node_is_a_scene_singleton(mrml_scene):
    first = FetalInpaintLogic.getParameterNode(mrml_scene)
    assert FetalInpaintLogic.getParameterNode(mrml_scene) is first
    assert first.GetAttribute("ModuleName") == "FetalInpaint"
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1


# ----------------------------------------------------------------------------- stop, kill, lock


def _launcher(folder, child="sys.argv[1:]"):
    """An executable that runs Python as its child and forwards no signal, like Slicer's PythonSlicer.

    ``child`` is the Python expression of the child's arguments (default: its own arguments).
    """
    import os
    import sys

    path = folder / "PythonLauncher"
    path.write_text(f"#!{sys.executable}\nimport subprocess, sys\n"
                    f"sys.exit(subprocess.call([{sys.executable!r}] + {child}))\n")
    path.chmod(0o755)
    assert os.access(path, os.X_OK)
    return str(path)


def _pollUntilEnded(logic, run, timeout):
    deadline = time.monotonic() + timeout
    status = logic.pollTraining(run)
    while status.running:
        assert time.monotonic() < deadline, f"training still running: {status.message}"
        time.sleep(0.1)
        status = logic.pollTraining(run)
    return status


posixOnly = pytest.mark.skipif(__import__("os").name == "nt", reason="the launcher stand-in is a #! script")


@posixOnly
def test_stop_reaches_the_trainer_behind_a_launcher_and_a_second_start_is_refused(mrml_scene, tmp_path):
    from FetalInpaintLib.control import process_alive, read_lock
    from FetalInpaintLib.errors import TrainingLockedError

    logic = FetalInpaintLogic(pythonExecutable=_launcher(tmp_path))
    volumes = _trainingVolumes(mrml_scene, 2)
    output = tmp_path / "run"
    run = logic.startTraining(volumes, output, epochs=500, **TINY_TRAINING)
    _waitFor(lambda: (output / "resume.pt").exists() or run.process.poll() is not None, 120, "the first epoch")
    trainer = read_lock(output)["pid"]
    assert trainer != run.process.pid and process_alive(trainer)  # the launcher's child writes the files

    for other in (logic, FetalInpaintLogic()):  # this module's logic, and another Slicer's
        with pytest.raises(TrainingLockedError, match="stop it or wait until it ends"):
            other.startTraining(volumes, output, epochs=500, resume=True, **TINY_TRAINING)
    assert logic.trainingLockOwner(output)["pid"] == trainer

    logic.requestStop(run)
    status = _pollUntilEnded(logic, run, 60)
    assert status.outcome == "stopped" and status.stopped and status.canResume, status.message
    assert f"after {status.epochsCompleted} completed epoch(s); tick Resume" in status.message
    assert not process_alive(trainer)
    assert not (output / "training.lock").exists() and not (output / "stop-training").exists()
    modified = (output / "resume.pt").stat().st_mtime_ns
    time.sleep(1.0)
    assert (output / "resume.pt").stat().st_mtime_ns == modified  # nobody writes to the folder any more


@posixOnly
def test_a_training_that_ignores_the_stop_is_killed_with_its_process_tree(mrml_scene, tmp_path):
    from FetalInpaintLib.control import process_alive

    # The launcher's child never looks at the stop file: it records its PID and sleeps.
    pidFile = tmp_path / "grandchild.pid"
    sleeper = repr(["-c", f"import os, time; open({str(pidFile)!r}, 'w').write(str(os.getpid())); time.sleep(600)"])
    logic = FetalInpaintLogic(pythonExecutable=_launcher(tmp_path, sleeper))
    run = logic.startTraining(_trainingVolumes(mrml_scene, 1), tmp_path / "run", **TINY_TRAINING)
    _waitFor(lambda: pidFile.exists() and pidFile.read_text(), 60, "the grandchild")
    grandchild = int(pidFile.read_text())
    run.stopGraceSeconds = 0.5
    logic.requestStop(run)
    assert logic.pollTraining(run).outcome == "stopping"
    status = _pollUntilEnded(logic, run, 30)
    assert status.outcome == "killed" and "ended by force" in status.message
    assert "nothing was saved to resume" in status.message and not status.canResume
    _waitFor(lambda: not process_alive(grandchild), 10, "the grandchild to end")


def test_module_cleanup_stops_every_running_training(mrml_scene, tmp_path):
    logic = FetalInpaintLogic()
    volumes = _trainingVolumes(mrml_scene, 1)
    runs = [logic.startTraining(volumes, tmp_path / name, epochs=500, **TINY_TRAINING) for name in ("a", "b")]
    statuses = logic.stopAllTrainings(timeout=60)
    assert [status.outcome for status in statuses] == ["stopped", "stopped"]
    assert all(run.process.poll() is not None for run in runs)


def test_stop_right_after_start_and_resume_agree(mrml_scene, tmp_path):
    logic = FetalInpaintLogic()
    volumes = _trainingVolumes(mrml_scene, 1)
    run = logic.startTraining(volumes, tmp_path, epochs=3, **TINY_TRAINING)
    logic.requestStop(run)  # before the process has even imported torch
    status = _pollUntilEnded(logic, run, 120)
    assert status.outcome == "stopped" and status.canResume and status.epochsCompleted == 0, status.message
    assert "continue from epoch 1" in status.message
    resumed = logic.startTraining(volumes, tmp_path, epochs=3, resume=True, **TINY_TRAINING)  # not "nothing to resume"
    assert _pollUntilEnded(logic, resumed, 120).outcome == "finished"


def test_a_stale_lock_is_taken_over(mrml_scene, tmp_path):
    import socket
    import subprocess
    import sys

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    (tmp_path / "training.lock").write_text(json.dumps({"pid": ended.pid, "host": socket.gethostname(), "started": 0}))
    logic = FetalInpaintLogic()
    assert logic.trainingLockOwner(tmp_path) is None
    run = logic.startTraining(_trainingVolumes(mrml_scene, 1), tmp_path, epochs=1, **TINY_TRAINING)
    assert _pollUntilEnded(logic, run, 120).outcome == "finished", (tmp_path / "training.log").read_text()
    assert not (tmp_path / "training.lock").exists()


def test_killing_a_training_spares_the_process_named_by_another_computers_lock(tmp_path):
    import subprocess
    import sys

    from FetalInpaintLib.control import new_process_group_options

    sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
    training = subprocess.Popen(sleep, **new_process_group_options())
    bystander = subprocess.Popen(sleep)  # a process of this computer with the PID the remote lock names
    try:
        run = TrainingProcess(process=training, command=sleep, outputDirectory=tmp_path, epochs=1, startTime=0.0,
                              startedAt=time.time() - 1.0)
        (tmp_path / "training.lock").write_text(
            json.dumps({"pid": bystander.pid, "host": "another-computer", "started": time.time()}))
        FetalInpaintLogic._killTraining(run)
        assert training.poll() is not None
        time.sleep(0.2)
        assert bystander.poll() is None
        assert (tmp_path / "training.lock").exists()  # the remote training's lock stays
    finally:
        for process in (training, bystander):
            if process.poll() is None:
                process.kill()
                process.wait()


def test_a_failed_resume_shows_its_own_error_not_the_previous_one(mrml_scene, tmp_path):
    logic = FetalInpaintLogic()
    volumes = _trainingVolumes(mrml_scene, 1)
    (tmp_path / "resume.pt").write_bytes(b"interrupted run")
    messages = []
    for strength in (1.5, 1.25):
        run = logic.startTraining(volumes, tmp_path, corruptorStrength=strength, resume=True, **TINY_TRAINING)
        status = _pollUntilEnded(logic, run, 120)
        assert status.outcome == "failed"
        messages.append(status.message)
    assert "got 1.5" in messages[0]
    assert "got 1.25" in messages[1] and "got 1.5" not in messages[1]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a computer without CUDA")
def test_cuda_on_a_cpu_only_computer_says_so(tinyCheckpoint):
    with pytest.raises(FetalInpaintError, match="no CUDA GPU on this computer; choose device 'cpu'") as raised:
        FetalInpaintLogic().loadModel(tinyCheckpoint, device="cuda")
    assert "corrupt" not in str(raised.value)


def test_a_single_image_is_sliced_and_refused_alike_in_training_and_export(mrml_scene, tinyCheckpoint):
    logic = FetalInpaintLogic()
    single = _obliqueVolume(mrml_scene, _phantomVolume(shape=(48, 48, 1)), name="single", spacing=(1.0, 1.0, 1.0))
    FetalInpaintLogic.checkVolumeFitsPatch(logic.volumeData(single), 32)  # its one 48 x 48 slice
    assert logic.computeFeatures(single, tinyCheckpoint).shape == (16, 48, 48, 1)
    thin = _obliqueVolume(mrml_scene, _phantomVolume(shape=(48, 48, 2)), name="thin", spacing=(1.0, 1.0, 1.0))
    for action in (lambda: logic.computeFeatures(thin, tinyCheckpoint),
                   lambda: logic.startTraining([thin], tinyCheckpoint.parent / "unused", **TINY_TRAINING)):
        with pytest.raises(InvalidVolumeError, match="'thin' are 48 x 2 voxels"):
            action()
