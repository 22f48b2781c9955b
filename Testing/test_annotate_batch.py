"""Headless file I/O of FetalAnnotateLib: volumes (NIfTI/NRRD/DICOM), .seg.nrrd, classifier files, batch."""

import numpy as np
import pytest

ANGLE = np.deg2rad(15)
OBLIQUE = np.array([[np.cos(ANGLE), 0, np.sin(ANGLE)], [0, 1, 0], [-np.sin(ANGLE), 0, np.cos(ANGLE)]])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A classifier trained on one phantom and saved; a second phantom to apply it to."""
    from FetalAnnotateLib import AnnotationSession
    from FetalAnnotateLib.classifier_io import save_classifier
    from FetalAnnotateLib.phantom import example_strokes, make_phantom

    first = make_phantom(shape=(10, 56, 56), seed=1)
    session = AnnotationSession(first.image, first.spacing)
    session.update(example_strokes(first.label_map))
    classifier = session.pixel_classifier()
    path = save_classifier(tmp_path_factory.mktemp("classifier") / "phantom.skops", classifier,
                           ["background", "fetus", "placenta"], metadata={"seed": 1})
    return path, classifier, make_phantom(shape=(8, 48, 48), seed=5)


def write_image(path, array, spacing_zyx, origin=(4.0, -3.0, 12.0), direction=OBLIQUE):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    image.SetOrigin(origin)
    image.SetDirection(np.asarray(direction, float).ravel().tolist())
    sitk.WriteImage(image, str(path))
    return image


def write_dicom_series(folder, array, spacing_zyx, origin=(4.0, -3.0, 12.0)):
    """One MR slice per file, axial, with the position tags DICOM readers sort by."""
    import SimpleITK as sitk

    folder.mkdir()
    volume = sitk.GetImageFromArray(np.clip(array, -32000, 32000).astype(np.int16))
    volume.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    volume.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for index in range(volume.GetDepth()):
        slice_image = volume[:, :, index]
        position = volume.TransformIndexToPhysicalPoint((0, 0, index))
        for tag, value in (("0008|0060", "MR"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.2"), ("0020|0013", str(index + 1)),
                           ("0020|0032", "\\".join(f"{p:.6f}" for p in position)),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0028|0030", f"{spacing_zyx[1]:.6f}\\{spacing_zyx[2]:.6f}"),
                           ("0018|0050", f"{spacing_zyx[0]:.6f}"),
                           ("0008|0018", f"1.2.826.0.1.3680043.2.1125.1.2.{index + 1}")):
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{index:03d}.dcm"))
        writer.Execute(slice_image)


def test_read_volume_formats_keep_geometry(tmp_path):
    from FetalAnnotateLib.segio import VolumeFileError, read_volume

    array = np.random.default_rng(0).normal(100, 10, (6, 20, 24)).astype(np.float32)
    for name in ("a.nii.gz", "b.nrrd"):
        written = write_image(tmp_path / name, array, (3.0, 1.2, 1.1))
        volume = read_volume(tmp_path / name)
        np.testing.assert_allclose(volume.array, array, rtol=1e-6)
        np.testing.assert_allclose(volume.spacing, (3.0, 1.2, 1.1), rtol=1e-6)
        np.testing.assert_allclose(volume.origin, written.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(volume.direction, OBLIQUE, atol=1e-6)
    assert read_volume(tmp_path / "a.nii.gz").name == "a"

    write_dicom_series(tmp_path / "dicom", array, (3.0, 1.2, 1.1))
    dicom = read_volume(tmp_path / "dicom")
    np.testing.assert_allclose(dicom.array, np.round(array), atol=1)
    np.testing.assert_allclose(dicom.spacing, (3.0, 1.2, 1.1), rtol=1e-5)
    assert dicom.name == "dicom"

    (tmp_path / "broken.nii.gz").write_bytes(b"not an image")
    with pytest.raises(VolumeFileError, match="cannot read"):
        read_volume(tmp_path / "broken.nii.gz")
    with pytest.raises(VolumeFileError, match="does not exist"):
        read_volume(tmp_path / "missing.nrrd")


def test_seg_nrrd_round_trip_and_slicerio(tmp_path):
    import slicerio

    from FetalAnnotateLib.segio import read_segmentation, write_segmentation

    labels = np.zeros((5, 8, 9), np.uint8)
    labels[1:3, 2:5, 3:6] = 1
    labels[4, 0:2, 0:2] = 2
    path = write_segmentation(tmp_path / "x.seg.nrrd", labels, ["fetus", "placenta", "empty"],
                              spacing=(3.0, 1.5, 1.2), origin=(10.0, 20.0, 30.0), direction=OBLIQUE,
                              colors=[(1, 0, 0), (0, 1, 0), (0, 0, 1)])

    read = slicerio.read_segmentation(str(path))
    assert [segment["name"] for segment in read["segments"]] == ["fetus", "placenta", "empty"]
    assert [segment["labelValue"] for segment in read["segments"]] == [1, 2, 3]
    np.testing.assert_allclose(read["segments"][1]["color"], (0, 1, 0))
    expected = np.eye(4)
    expected[:3, :3] = OBLIQUE * np.array([1.2, 1.5, 3.0])
    expected[:3, 3] = (10.0, 20.0, 30.0)
    np.testing.assert_allclose(read["ijkToLPS"], expected, atol=1e-6)
    back, names = read_segmentation(path)
    np.testing.assert_array_equal(back, labels)
    assert names == ["fetus", "placenta", "empty"]


def test_seg_nrrd_opens_in_slicers_segmentation_reader(tmp_path, mrml_scene):
    """Slicer's own storage node (slicer-core) loads the file as named segments."""
    import slicer

    from FetalAnnotateLib.segio import write_segmentation

    labels = np.zeros((4, 6, 7), np.uint8)
    labels[1, 2:4, 2:5] = 1
    labels[2, 1:3, 1:3] = 2
    path = write_segmentation(tmp_path / "y.seg.nrrd", labels, ["fetus (auto)", "background (auto)"],
                              spacing=(2.0, 1.0, 1.0))
    node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))

    assert storage.ReadData(node)

    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == \
        ["fetus (auto)", "background (auto)"]
    reference = slicer.util.addVolumeFromArray(np.zeros(labels.shape, np.float32),
                                               ijkToRAS=np.diag([-1.0, -1.0, 2.0, 1.0]))
    fetus = slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentation.GetNthSegmentID(0), reference)
    np.testing.assert_array_equal(fetus > 0, labels == 1)


def test_batch_applies_a_saved_classifier_to_a_folder(trained, tmp_path):
    import SimpleITK as sitk
    import slicerio

    from FetalAnnotateLib.batch import apply_classifier_to_files

    path, classifier, second = trained
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    written = write_image(inputs / "case1.nii.gz", second.image, second.spacing)
    write_image(inputs / "case2.nrrd", second.image[::-1].copy(), second.spacing)
    (inputs / "notes.txt").write_text("not a volume: ignored")
    (inputs / "broken.nii.gz").write_bytes(b"corrupted")
    messages = []

    items = apply_classifier_to_files(path, inputs, tmp_path / "out",
                                      progress=lambda fraction, message: messages.append((fraction, message)))

    assert [item.source.name for item in items] == ["broken.nii.gz", "case1.nii.gz", "case2.nrrd"]
    assert items[0].output is None and "cannot read" in items[0].error
    assert [item.output.name for item in items[1:]] == ["case1.seg.nrrd", "case2.seg.nrrd"]
    assert all(item.error is None for item in items[1:])
    read = slicerio.read_segmentation(str(items[1].output))
    assert [segment["name"] for segment in read["segments"]] == ["background", "fetus", "placenta"]
    expected = np.argmax(classifier.predict_proba(second.image, second.spacing), axis=0) + 1
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(items[1].output)))
    np.testing.assert_array_equal(labels, expected)
    output = sitk.ReadImage(str(items[1].output))
    np.testing.assert_allclose(output.GetOrigin(), written.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(output.GetDirection(), written.GetDirection(), atol=1e-6)
    assert messages[-1][0] == 1.0
    assert all(0.0 <= fraction <= 1.0 for fraction, _ in messages)


def test_batch_cancel_and_bad_classifier(trained, tmp_path):
    from FetalAnnotateLib import OperationCancelled
    from FetalAnnotateLib.batch import apply_classifier_to_files
    from FetalAnnotateLib.classifier_io import ClassifierFileError

    path, _, second = trained
    write_image(tmp_path / "case.nrrd", second.image, second.spacing)

    with pytest.raises(OperationCancelled):
        apply_classifier_to_files(path, tmp_path / "case.nrrd", tmp_path / "out", progress=lambda f, m: True)
    assert not (tmp_path / "out" / "case.seg.nrrd").exists()
    (tmp_path / "fake.skops").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ClassifierFileError, match="not a FetalAnnotate classifier"):
        apply_classifier_to_files(tmp_path / "fake.skops", tmp_path / "case.nrrd", tmp_path / "out")
