"""The headless test bed itself: real slicer-core nodes and logics behave as in Slicer."""

import numpy as np


def test_segment_labelmap_round_trip_through_real_logics(mrml_scene):
    import slicer

    image = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    volume = slicer.util.addVolumeFromArray(image, name="image")
    volume.SetSpacing(1.0, 2.0, 3.0)
    segmentation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("fetus")
    painted = np.zeros(image.shape, np.uint8)
    painted[2, 2:4, 3:5] = 1

    slicer.util.updateSegmentBinaryLabelmapFromArray(painted, segmentation, segment_id, volume)
    read_back = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)

    assert read_back.shape == image.shape
    np.testing.assert_array_equal(read_back, painted)
    assert isinstance(slicer.modules.segmentations.logic(), slicer.vtkSlicerSegmentationsModuleLogic)
