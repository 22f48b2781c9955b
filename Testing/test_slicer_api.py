"""The Slicer calls of FetalAnnotateLogic on real slicer-core objects, under parent transforms.

Each test runs with no transform, a transform on the volume, on the segmentation, one shared
transform on both, and two different ones (rotations with translations, so no voxel grid is
axis-aligned with another). Expected voxels are computed here with numpy from the matrices the
test set, independently of Slicer's transform and resampling code:

- ``_transformBetween``: ``vtkMRMLTransformNode.GetMatrixTransformBetweenNodes`` (``GetTransformBetweenNodes``
  for non-linear ones);
- ``segmentArray``: ``vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage``;
- ``labelmapInSegmentationFrame``: ``vtkOrientedImageDataResample.TransformOrientedImage``;
- ``writeResultSegments``: ``vtkSegment.AddRepresentation``,
  ``vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment``,
  ``SetReferenceImageGeometryParameterFromVolumeNode``;
- ``editableArea``: the ``vtkMRMLSegmentationNode.EditAllowed*`` modes and segment visibility.
"""

import numpy as np
import pytest
from vtk.util import numpy_support

TRANSFORMS = ["none", "volume", "segmentation", "same", "different"]
SHAPE = (6, 24, 28)  # z, y, x


def rotation(axis, degrees, translation):
    """4x4 rigid matrix: rotation about a coordinate axis (0, 1, 2), then a translation."""
    angle = np.deg2rad(degrees)
    first, second = [index for index in range(3) if index != axis]
    matrix = np.eye(4)
    matrix[first, first] = matrix[second, second] = np.cos(angle)
    matrix[first, second], matrix[second, first] = -np.sin(angle), np.sin(angle)
    matrix[:3, 3] = translation
    return matrix


VOLUME_TRANSFORM = rotation(2, 30.0, (3.3, -2.1, 5.0))
SEGMENTATION_TRANSFORM = rotation(0, -17.0, (-4.0, 1.7, -2.5))
# Oblique source grid: 1.3 x 1.1 mm in plane, 3 mm slices, rotated 20 degrees about the slice axis.
VOLUME_IJK_TO_RAS = rotation(2, 20.0, (10.0, -20.0, 5.0)) @ np.diag([1.1, 1.3, 3.0, 1.0])


def vtk_matrix(array):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, array[row, column])
    return matrix


def image_to_world(image):
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


@pytest.fixture(params=TRANSFORMS)
def transformed_scene(request, mrml_scene):
    """A volume and an empty segmentation (reference geometry: the volume) under the transforms of a case.

    Returns the volume, the segmentation, and the numpy matrices from the volume's and the
    segmentation's frames to world.
    """
    import slicer

    image = np.random.default_rng(3).normal(100.0, 20.0, SHAPE).astype(np.float32)
    volume = slicer.util.addVolumeFromArray(image, ijkToRAS=VOLUME_IJK_TO_RAS, name="source")
    segmentation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Strokes")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    volume_to_world, segmentation_to_world = np.eye(4), np.eye(4)
    if request.param in ("volume", "same", "different"):
        volume_to_world = VOLUME_TRANSFORM
    if request.param in ("segmentation", "different"):
        segmentation_to_world = SEGMENTATION_TRANSFORM
    if request.param == "same":
        segmentation_to_world = VOLUME_TRANSFORM
    nodes = {}
    for node, matrix in ((volume, volume_to_world), (segmentation, segmentation_to_world)):
        if not np.array_equal(matrix, np.eye(4)):
            key = matrix.tobytes()
            if key not in nodes:
                nodes[key] = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
                nodes[key].SetMatrixTransformToParent(vtk_matrix(matrix))
            node.SetAndObserveTransformNodeID(nodes[key].GetID())
    return volume, segmentation, volume_to_world, segmentation_to_world


def add_segment(segmentation, name, array, volume_to_segmentation):
    """A segment holding ``array`` (z, y, x on the volume's grid), its labelmap placed with numpy matrices."""
    import slicer
    import vtk

    image = slicer.vtkOrientedImageData()
    image.SetDimensions(array.shape[::-1])
    image.SetImageToWorldMatrix(vtk_matrix(volume_to_segmentation @ VOLUME_IJK_TO_RAS))
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = array.astype(np.uint8).ravel()
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), image)
    segmentation.GetSegmentation().AddSegment(segment)
    return segmentation.GetSegmentation().GetSegmentIdBySegment(segment)


def stored_voxels_on_volume_grid(segmentation, segment_id, segmentation_to_world, volume_to_world):
    """A segment's stored labelmap mapped voxel by voxel onto the volume's grid with numpy.

    Every stored voxel centre must fall on a volume voxel centre (the results are written on the
    volume's grid, never resampled).
    """
    import slicer

    image = slicer.vtkOrientedImageData()
    segmentation.GetBinaryLabelmapRepresentation(segment_id, image)
    voxels = np.zeros(SHAPE, bool)
    extent = image.GetExtent()
    if extent[0] > extent[1]:
        return voxels
    stored = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(image.GetDimensions()[::-1])
    k, j, i = np.nonzero(stored)
    ijk = np.stack([i + extent[0], j + extent[2], k + extent[4], np.ones_like(i)]).astype(float)
    to_volume_ijk = np.linalg.inv(volume_to_world @ VOLUME_IJK_TO_RAS) @ segmentation_to_world @ image_to_world(image)
    mapped = (to_volume_ijk @ ijk)[:3]
    rounded = np.round(mapped).astype(int)
    np.testing.assert_allclose(mapped, rounded, atol=1e-4)
    voxels[rounded[2], rounded[1], rounded[0]] = True
    return voxels


def test_transform_between_nodes_is_one_exact_matrix(transformed_scene):
    """Two linear parents give a vtkTransform with the numpy matrix (a general transform would be resampled)."""
    import slicer
    import vtk

    from FetalAnnotateLogic.logic import _transformBetween

    volume, segmentation, volume_to_world, segmentation_to_world = transformed_scene
    transform = _transformBetween(volume, segmentation)
    if np.array_equal(volume_to_world, segmentation_to_world):
        assert transform is None
        return
    assert isinstance(transform, vtk.vtkTransform)
    linear = vtk.vtkTransform()
    assert slicer.vtkOrientedImageDataResample.IsTransformLinear(transform, linear)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(linear.GetMatrix()),
                               np.linalg.inv(segmentation_to_world) @ volume_to_world, atol=1e-12)


def test_segment_array_reads_strokes_exactly(transformed_scene):
    """ResampleOrientedImageToReferenceOrientedImage through the transforms: every stroke voxel lands on its voxel."""
    import FetalAnnotateLogic

    volume, segmentation, volume_to_world, segmentation_to_world = transformed_scene
    strokes = np.random.default_rng(0).random(SHAPE) > 0.7
    segment_id = add_segment(segmentation, "fetus", strokes, np.linalg.inv(segmentation_to_world) @ volume_to_world)

    read = FetalAnnotateLogic.FetalAnnotateLogic().segmentArray(volume, segmentation, segment_id)

    np.testing.assert_array_equal(read, strokes)


def test_labelmap_in_segmentation_frame_moves_the_grid(transformed_scene):
    """TransformOrientedImage (linear): the voxels are kept, the image-to-world matrix is the numpy one."""
    import FetalAnnotateLogic

    volume, segmentation, volume_to_world, segmentation_to_world = transformed_scene
    mask = np.random.default_rng(1).random(SHAPE) > 0.5

    image = FetalAnnotateLogic.FetalAnnotateLogic.labelmapInSegmentationFrame(volume, segmentation, mask)

    np.testing.assert_allclose(image_to_world(image),
                               np.linalg.inv(segmentation_to_world) @ volume_to_world @ VOLUME_IJK_TO_RAS, atol=1e-9)
    assert image.GetExtent() == volume.GetImageData().GetExtent()
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(SHAPE)
    np.testing.assert_array_equal(voxels > 0, mask)


def test_write_result_segments_new_and_overwritten(transformed_scene):
    """AddRepresentation (new segment) then SetBinaryLabelmapToSegment (second round): voxels exact both times."""
    import FetalAnnotateLogic

    volume, segmentation, volume_to_world, segmentation_to_world = transformed_scene
    logic = FetalAnnotateLogic.FetalAnnotateLogic()
    rng = np.random.default_rng(2)
    for _ in range(2):
        masks = [rng.random(SHAPE) > 0.5, rng.random(SHAPE) > 0.8]
        ids = logic.writeResultSegments(volume, None, segmentation, ["background", "fetus"], masks)
        for segment_id, mask in zip(ids, masks):
            np.testing.assert_array_equal(
                stored_voxels_on_volume_grid(segmentation, segment_id, segmentation_to_world, volume_to_world), mask)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2


def test_new_output_segmentation_takes_the_volume_geometry(transformed_scene):
    """SetReferenceImageGeometryParameterFromVolumeNode: an empty output gets the volume as its reference geometry."""
    import FetalAnnotateLogic

    volume, _, volume_to_world, _ = transformed_scene
    output = volume.GetScene().AddNewNodeByClass("vtkMRMLSegmentationNode", "Results")

    ids = FetalAnnotateLogic.FetalAnnotateLogic().writeResultSegments(volume, None, output, ["fetus"],
                                                                      [np.ones(SHAPE, bool)])

    role = output.GetReferenceImageGeometryReferenceRole()
    assert output.GetNodeReference(role) is volume
    np.testing.assert_array_equal(stored_voxels_on_volume_grid(output, ids[0], np.eye(4), volume_to_world),
                                  np.ones(SHAPE, bool))


@pytest.mark.parametrize("mode", ["InsideSingleSegment", "InsideAllSegments", "InsideVisibleSegments",
                                  "OutsideAllSegments", "OutsideVisibleSegments"])
def test_editable_area_modes(transformed_scene, mode):
    """Each EditAllowed* mode: only region segments count, not classes nor results; with an intensity range."""
    import slicer

    import FetalAnnotateLogic

    volume, segmentation, volume_to_world, segmentation_to_world = transformed_scene
    to_segmentation = np.linalg.inv(segmentation_to_world) @ volume_to_world
    shown, hidden = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    shown[:, 2:12, 3:20] = True
    hidden[:, 10:20, 15:25] = True
    class_ids = [add_segment(segmentation, name, np.ones(SHAPE, bool), to_segmentation)
                 for name in ("background", "fetus")]
    shown_id = add_segment(segmentation, "region", shown, to_segmentation)
    hidden_id = add_segment(segmentation, "hidden region", hidden, to_segmentation)
    segmentation.GetDisplayNode().SetSegmentVisibility(hidden_id, False)
    logic = FetalAnnotateLogic.FetalAnnotateLogic()
    logic.writeResultSegments(volume, segmentation, segmentation, ["background"], [np.ones(SHAPE, bool)])
    expected = {"InsideSingleSegment": shown, "InsideAllSegments": shown | hidden, "InsideVisibleSegments": shown,
                "OutsideAllSegments": ~(shown | hidden), "OutsideVisibleSegments": ~shown}[mode]
    maskMode = getattr(slicer.vtkMRMLSegmentationNode, f"EditAllowed{mode}")

    editable = logic.editableArea(volume, segmentation, FetalAnnotateLogic.Masking(maskMode, shown_id), class_ids)
    np.testing.assert_array_equal(editable, expected)

    image = slicer.util.arrayFromVolume(volume)
    masking = FetalAnnotateLogic.Masking(maskMode, shown_id, (90.0, 120.0))
    editable = logic.editableArea(volume, segmentation, masking, class_ids)
    np.testing.assert_array_equal(editable, expected & (image >= 90.0) & (image <= 120.0))


@pytest.mark.parametrize("masked", [False, True])
def test_segment_gives_the_engine_labels(transformed_scene, masked):
    """End to end through every call above: results are the engine's labels, voxel for voxel (inside the mask)."""
    import slicer

    import FetalAnnotateLogic
    from FetalAnnotateLib import AnnotationSession

    volume, segmentation, volume_to_world, segmentation_to_world = transformed_scene
    to_segmentation = np.linalg.inv(segmentation_to_world) @ volume_to_world
    image = np.zeros(SHAPE, np.float32)
    image[:, 8:18, 9:20] = 100.0
    image += np.random.default_rng(0).normal(0.0, 10.0, SHAPE).astype(np.float32)
    slicer.util.updateVolumeFromArray(volume, image)
    strokes = np.zeros(SHAPE, np.uint8)
    strokes[2:4, 1:3, 2:26] = 1
    strokes[2:4, 11:15, 12:17] = 2
    for value, name in ((1, "background"), (2, "square")):
        add_segment(segmentation, name, strokes == value, to_segmentation)
    region = np.zeros(SHAPE, bool)
    region[:, :, :16] = True
    region_id = add_segment(segmentation, "left part", region, to_segmentation)
    spacing = tuple(np.linalg.norm(VOLUME_IJK_TO_RAS[:3, :3], axis=0)[::-1])
    engine = AnnotationSession(image, spacing).update(strokes)

    masking = FetalAnnotateLogic.Masking(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment, region_id)

    result = FetalAnnotateLogic.FetalAnnotateLogic().segment(
        volume, segmentation, segmentation.GetSegmentation().GetSegmentIDs()[:2], masking=masking if masked else None)

    for value, segment_id in zip((1, 2), result.resultSegmentIds):
        written = stored_voxels_on_volume_grid(segmentation, segment_id, segmentation_to_world, volume_to_world)
        np.testing.assert_array_equal(written, (engine.labels == value) & (region if masked else True))
