"""FetalInpaintLogic against a real MRML scene (slicer-core): geometry, background training, errors."""

import json

import numpy as np
import pytest
import vtk

from FetalInpaintLib.errors import CheckpointError, FetalInpaintError, InvalidVolumeError
from FetalInpaintLogic import FetalInpaintLogic, readProgress


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
    with pytest.raises(InvalidVolumeError, match=r"'tiny' are 20 x 30 voxels, smaller than the 32 x 32"):
        FetalInpaintLogic().startTraining([node], tmp_path, patchSize=32)
    assert not any(tmp_path.iterdir())  # nothing written, no process started


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    logic = FetalInpaintLogic()
    with pytest.raises(CheckpointError, match="no checkpoint selected"):
        logic.loadModel("")
    with pytest.raises(CheckpointError, match="does not exist"):
        logic.loadModel(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a torch file")
    with pytest.raises(CheckpointError):
        logic.loadModel(corrupt)


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


def test_loss_plot_is_a_chart_with_train_and_validation_series(mrml_scene):
    records = [
        {"epoch": 0.5, "loss": 0.2},
        {"epoch": 1.0, "loss": 0.1, "val_loss": 0.15},
        {"epoch": 1.5, "loss": 0.08},
    ]
    chart = FetalInpaintLogic.updateLossPlot(records[:2], scene=mrml_scene)
    assert FetalInpaintLogic.updateLossPlot(records, chartNode=chart) is chart

    assert chart.GetNumberOfPlotSeriesNodes() == 2
    tables = {chart.GetNthPlotSeriesNode(i).GetYColumnName(): chart.GetNthPlotSeriesNode(i).GetTableNode()
              for i in range(2)}
    import slicer

    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(tables["loss"], "loss"), [0.2, 0.1, 0.08])
    np.testing.assert_allclose(slicer.util.arrayFromTableColumn(tables["val_loss"], "epoch"), [1.0])


def test_parameter_node_is_a_scene_singleton(mrml_scene):
    first = FetalInpaintLogic.getParameterNode(mrml_scene)
    assert FetalInpaintLogic.getParameterNode(mrml_scene) is first
    assert first.GetAttribute("ModuleName") == "FetalInpaint"
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1
