"""Headless file I/O of FetalAnnotateLib: volumes (NIfTI/NRRD/DICOM), .seg.nrrd, classifier files, batch."""

import csv
import glob
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

ANGLE = np.deg2rad(15)
OBLIQUE = np.array([[np.cos(ANGLE), 0, np.sin(ANGLE)], [0, 1, 0], [-np.sin(ANGLE), 0, np.cos(ANGLE)]])
# Another process writing a file with atomic_path: argv = library folder, file, "killed" or "waiting".
WRITER = """
import os, sys
sys.path.insert(0, sys.argv[1])
from FetalAnnotateLib.segio import atomic_path
with atomic_path(sys.argv[2]) as temporary:
    open(temporary, "wb").write(b"half a segmentation")
    print(temporary, flush=True)
    if sys.argv[3] == "killed":
        os._exit(1)  # no clean-up runs, as when the process is killed
    sys.stdin.readline()  # still writing until told to finish
"""


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


def start_writer(path, killed):
    """A process writing ``path`` with ``atomic_path``, killed while writing (its temporary file is left behind) or
    waiting for a line on its standard input to finish; returns it and its temporary file."""
    import FetalAnnotateLib

    process = subprocess.Popen([sys.executable, "-c", WRITER, str(Path(FetalAnnotateLib.__file__).parents[1]),
                                str(path), "killed" if killed else "waiting"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    temporary = Path(process.stdout.readline().strip())
    if killed:
        process.communicate(timeout=60)
    return process, temporary


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

    huge = array.astype(np.float64) * 1e300  # finite, beyond float32's range: read as it is
    write_image(tmp_path / "huge.nrrd", huge, (3.0, 1.2, 1.1))
    np.testing.assert_array_equal(read_volume(tmp_path / "huge.nrrd").array, huge)
    integers = np.arange(6 * 20 * 24, dtype=np.int16).reshape(6, 20, 24)
    write_image(tmp_path / "integers.nrrd", integers, (3.0, 1.2, 1.1))
    assert read_volume(tmp_path / "integers.nrrd").array.dtype == np.int16

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


def labels_of(path):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_batch_applies_a_saved_classifier_to_a_folder(trained, tmp_path):
    import slicerio

    from FetalAnnotateLib.batch import apply_classifier_to_files

    path, classifier, second = trained
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    written = write_image(inputs / "case1.nii.gz", second.image, second.spacing)
    write_image(inputs / "case2.nrrd", second.image[::-1].copy(), second.spacing)
    (inputs / "notes.txt").write_text("not a volume: skipped")
    (inputs / "broken.nii.gz").write_bytes(b"corrupted")
    messages, lines = [], []

    result = apply_classifier_to_files(path, inputs, tmp_path / "out", log=lines.append,
                                       progress=lambda fraction, message: messages.append((fraction, message)))

    items = result.items
    assert [item.source.name for item in items] == ["broken.nii.gz", "case1.nii.gz", "case2.nrrd"]
    assert items[0].status == "failed" and items[0].output is None and "cannot read" in items[0].error
    assert [item.output.name for item in items[1:]] == ["case1.seg.nrrd", "case2.seg.nrrd"]
    assert [item.status for item in items[1:]] == ["segmented", "segmented"]
    assert result.failed == [items[0]]
    assert [(path.name, reason) for path, reason in result.skipped] == [("notes.txt", "not a volume file "
                                                                        "(.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd)")]
    read = slicerio.read_segmentation(str(items[1].output))
    assert [segment["name"] for segment in read["segments"]] == ["background", "fetus", "placenta"]
    expected = np.argmax(classifier.predict_proba(second.image, second.spacing), axis=0) + 1
    np.testing.assert_array_equal(labels_of(items[1].output), expected)
    import SimpleITK as sitk

    output = sitk.ReadImage(str(items[1].output))
    np.testing.assert_allclose(output.GetOrigin(), written.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(output.GetDirection(), written.GetDirection(), atol=1e-6)
    assert messages[-1][0] == 1.0
    assert all(0.0 <= fraction <= 1.0 for fraction, _ in messages)
    with open(result.report_csv, newline="") as stream:
        rows = list(csv.reader(stream))
    assert [len(row) for row in rows] == [12] * 4  # 6 columns and 2 per class, also for the failed volume
    assert lines[0] == f"skipped {inputs / 'notes.txt'}: {result.skipped[0][1]}"
    assert lines[1].startswith("memory budget ")


def test_folder_inputs_skip_segmentations_probability_maps_and_feature_volumes(trained, tmp_path):
    """The engine's own outputs in an input folder are listed as skipped, not segmented."""
    import SimpleITK as sitk

    from FetalAnnotateLib.batch import apply_classifier_to_files
    from FetalAnnotateLib.segio import write_segmentation

    path, _, second = trained
    write_image(tmp_path / "case.nrrd", second.image, second.spacing)
    write_image(tmp_path / "case_fetus_probability.nrrd", np.zeros(second.image.shape, np.float32), second.spacing)
    write_image(tmp_path / "fetus probability.nii.gz", np.ones(second.image.shape, np.float32), second.spacing)
    write_segmentation(tmp_path / "old.seg.nrrd", second.label_map, ["a", "b", "c"])
    write_segmentation(tmp_path / "slicer-export.seg.nrrd", second.label_map, ["a", "b", "c"])
    (tmp_path / "slicer-export.seg.nrrd").rename(tmp_path / "segmentation.nrrd")
    features = sitk.GetImageFromArray(np.stack([second.image, second.image], axis=-1), isVector=True)
    sitk.WriteImage(features, str(tmp_path / "case_features.nrrd"))
    before = (tmp_path / "old.seg.nrrd").read_bytes()

    result = apply_classifier_to_files(path, tmp_path, tmp_path)

    assert [item.source.name for item in result.items] == ["case.nrrd"]
    reasons = {path.name: reason for path, reason in result.skipped}
    assert reasons == {
        "case_features.nrrd": "a volume of 2 components per voxel (e.g. exported features)",
        "case_fetus_probability.nrrd": "a probability map",
        "fetus probability.nii.gz": "a probability map",
        "old.seg.nrrd": "a segmentation (.seg.nrrd)",
        "segmentation.nrrd": "a segmentation (Slicer segmentation header)",
    }
    assert (tmp_path / "old.seg.nrrd").read_bytes() == before
    report = json.loads(result.report_json.read_text())
    assert {entry["reason"] for entry in report["skipped"]} == set(reasons.values())


def test_a_segmentation_given_as_input_is_never_overwritten(trained, tmp_path):
    from FetalAnnotateLib import FetalAnnotateError
    from FetalAnnotateLib.batch import apply_classifier_to_files
    from FetalAnnotateLib.segio import write_segmentation

    path, _, second = trained
    segmentation = write_segmentation(tmp_path / "case.seg.nrrd", second.label_map, ["hand", "edited", "work"])
    before = segmentation.read_bytes()

    with pytest.raises(FetalAnnotateError, match="no image volume to segment"):
        apply_classifier_to_files(path, segmentation, tmp_path)

    assert segmentation.read_bytes() == before
    assert sorted(child.name for child in tmp_path.iterdir()) == ["case.seg.nrrd"]


def test_inputs_with_the_same_name_are_refused_before_any_work(trained, tmp_path):
    from FetalAnnotateLib import FetalAnnotateError
    from FetalAnnotateLib.batch import apply_classifier_to_files

    path, _, second = trained
    for folder, name in (("a", "phantom.nrrd"), ("b", "phantom.nii.gz")):
        (tmp_path / folder).mkdir()
        write_image(tmp_path / folder / name, second.image, second.spacing)

    with pytest.raises(FetalAnnotateError, match="2 inputs would write the same output .*a/phantom.nrrd and "
                                                 ".*b/phantom.nii.gz"):
        apply_classifier_to_files(path, [tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_names_that_differ_only_in_letter_case_or_normalization_collide(trained, tmp_path):
    """On macOS and Windows Case.seg.nrrd and case.seg.nrrd are one file, and so are the two spellings of Café."""
    from FetalAnnotateLib import FetalAnnotateError
    from FetalAnnotateLib.batch import apply_classifier_to_files

    path, _, second = trained
    for folder, name in (("a", "Case.nrrd"), ("b", "case.nii.gz"), ("a", "Caf\u00e9.nrrd"), ("b", "Cafe\u0301.nrrd")):
        (tmp_path / folder).mkdir(exist_ok=True)
        write_image(tmp_path / folder / name, second.image, second.spacing)

    with pytest.raises(FetalAnnotateError, match="4 inputs would write the same output .*a/Case.nrrd and "
                                                 ".*b/case.nii.gz"):
        apply_classifier_to_files(path, [tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("place", ["read-only folder", "below a file"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(trained, tmp_path, place):
    from FetalAnnotateLib import FetalAnnotateError
    from FetalAnnotateLib.batch import apply_classifier_to_files

    path, _, second = trained
    write_image(tmp_path / "case.nrrd", second.image, second.spacing)
    if place == "read-only folder":
        output = tmp_path / "out"
        output.mkdir()
        output.chmod(0o555)
        try:
            with tempfile.TemporaryFile(dir=output):
                pytest.skip("this user may write into read-only folders (root, or Windows)")
        except PermissionError:
            pass
    else:
        (tmp_path / "notes.txt").write_text("a file")
        output = tmp_path / "notes.txt" / "out"
    lines = []

    with pytest.raises(FetalAnnotateError, match="cannot write into the output folder .*out .*; give a folder you "
                                                 "may write to with --output"):
        apply_classifier_to_files(path, tmp_path / "case.nrrd", output, log=lines.append)

    assert lines == []  # not even the memory budget: no volume was segmented
    if place == "read-only folder":
        output.chmod(0o755)
        assert list(output.iterdir()) == []


def test_truncated_and_corrupt_files_fail_their_item_with_a_clear_message(trained, tmp_path):
    from FetalAnnotateLib.batch import apply_classifier_to_files
    from FetalAnnotateLib.segio import VolumeFileError, check_volume_file, read_volume

    path, _, second = trained
    noisy = second.image + np.random.default_rng(0).normal(0, 5, second.image.shape).astype(np.float32)
    write_image(tmp_path / "whole.nii.gz", noisy, second.spacing)
    complete = (tmp_path / "whole.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(complete[: len(complete) * 2 // 3])
    flipped = bytearray(complete)
    flipped[len(flipped) // 2] ^= 0xFF
    (tmp_path / "flipped.nii.gz").write_bytes(bytes(flipped))
    for name in ("raw.nii", "plain.nrrd", "zipped.mha"):
        write_image(tmp_path / name, noisy, second.spacing)
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[:-100])
        with pytest.raises(VolumeFileError, match="truncated"):
            check_volume_file(tmp_path / name)
    with pytest.raises(VolumeFileError, match="cut.nii.gz is truncated: its compressed data ends early"):
        read_volume(tmp_path / "cut.nii.gz")

    result = apply_classifier_to_files(path, tmp_path, tmp_path / "out")

    status = {item.source.name: (item.status, item.error) for item in result.items}
    assert status["whole.nii.gz"] == ("segmented", None)
    assert "truncated" in status["cut.nii.gz"][1]
    assert "corrupt" in status["flipped.nii.gz"][1] or "truncated" in status["flipped.nii.gz"][1]
    assert all(status[name][0] == "failed" for name in status if name != "whole.nii.gz")
    assert sorted(child.name for child in (tmp_path / "out").iterdir() if child.name.endswith(".seg.nrrd")) == \
        ["whole.seg.nrrd"]


def test_the_grid_read_from_a_header_is_the_grid_of_the_read_volume(tmp_path):
    import SimpleITK as sitk

    from FetalAnnotateLib.segio import read_volume, read_volume_grid

    write_image(tmp_path / "oblique.nii.gz", np.zeros((3, 5, 7), np.int16), (4.0, 0.5, 0.25))
    flat = sitk.GetImageFromArray(np.zeros((5, 7), np.uint8))
    flat.SetSpacing((0.5, 0.25))
    flat.SetOrigin((3.0, 4.0))
    flat.SetDirection((0.0, 1.0, 1.0, 0.0))
    sitk.WriteImage(flat, str(tmp_path / "frame.nrrd"))
    for name in ("oblique.nii.gz", "frame.nrrd"):
        volume = read_volume(tmp_path / name)
        shape, spacing, origin, direction = read_volume_grid(tmp_path / name)
        assert shape == volume.array.shape and spacing == volume.spacing and origin == volume.origin
        np.testing.assert_array_equal(direction, volume.direction)


def test_integer_nifti_scaled_by_its_header_is_read_and_still_checked(tmp_path):
    from conftest import write_scaled_nifti

    from FetalAnnotateLib.segio import VolumeFileError, check_volume_file, read_volume

    stored = np.random.default_rng(0).integers(0, 100, (4, 32, 32)).astype(np.int16)
    for name in ("scaled.nii", "scaled.nii.gz"):
        volume = read_volume(write_scaled_nifti(tmp_path / name, stored))
        np.testing.assert_allclose(volume.array, 1.5 * stored + 3.0)
    data = (tmp_path / "scaled.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[:-100])
    with pytest.raises(VolumeFileError, match="truncated"):
        check_volume_file(tmp_path / "cut.nii")


def test_nothing_to_do_and_a_file_named_output_are_errors(trained, tmp_path):
    from FetalAnnotateLib import FetalAnnotateError
    from FetalAnnotateLib.batch import apply_classifier_to_files

    path, _, second = trained
    (tmp_path / "empty").mkdir()
    with pytest.raises(FetalAnnotateError, match="no image volume to segment"):
        apply_classifier_to_files(path, tmp_path / "empty", tmp_path / "out")
    write_image(tmp_path / "case.nrrd", second.image, second.spacing)
    with pytest.raises(FetalAnnotateError, match="looks like a file name; give a folder"):
        apply_classifier_to_files(path, tmp_path / "case.nrrd", tmp_path / "result.nii.gz")
    assert not (tmp_path / "result.nii.gz").exists()
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(FetalAnnotateError, match="is a file; give a folder"):
        apply_classifier_to_files(path, tmp_path / "case.nrrd", tmp_path / "taken")


def test_existing_outputs_are_kept_reported_and_overwritten_only_on_request(trained, tmp_path):
    from FetalAnnotateLib.batch import apply_classifier_to_files

    path, _, second = trained
    write_image(tmp_path / "case.nrrd", second.image, second.spacing)
    first = apply_classifier_to_files(path, tmp_path / "case.nrrd", tmp_path / "out").items[0]
    first.output.write_bytes(first.output.read_bytes())  # same content, new modification time
    stamp = first.output.stat().st_mtime_ns

    again = apply_classifier_to_files(path, tmp_path / "case.nrrd", tmp_path / "out").items[0]

    assert again.status == "existing" and first.output.stat().st_mtime_ns == stamp
    assert again.voxels == first.voxels and again.voxel_ml == pytest.approx(first.voxel_ml)
    redone = apply_classifier_to_files(path, tmp_path / "case.nrrd", tmp_path / "out", overwrite=True).items[0]
    assert redone.status == "segmented" and first.output.stat().st_mtime_ns != stamp


def test_overwrite_keeps_an_output_corrected_and_saved_again_from_slicer(trained, tmp_path, mrml_scene):
    import slicer

    from FetalAnnotateLib.batch import OUTPUT_MARK, apply_classifier_to_files
    from FetalAnnotateLib.segio import header_field

    path, _, second = trained
    for name in ("edited", "untouched"):
        write_image(tmp_path / f"{name}.nrrd", second.image, second.spacing)
    first = apply_classifier_to_files(path, tmp_path, tmp_path / "out")
    edited, untouched = (item.output for item in first.items)
    assert header_field(edited, OUTPUT_MARK) == hashlib.sha256(path.read_bytes()).hexdigest()
    # The user opens the output in Slicer, corrects it and saves it over itself.
    node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(edited))
    assert storage.ReadData(node)
    segment_id = node.GetSegmentation().GetNthSegmentID(0)
    labelmap = slicer.util.arrayFromSegmentInternalBinaryLabelmap(node, segment_id)  # shared with VTK
    labelmap[labelmap == 2] = 1  # the correction: the second class painted over with the first
    node.GetSegmentation().GetSegment(segment_id).Modified()
    assert storage.WriteData(node)
    corrected = edited.read_bytes()
    assert header_field(edited, OUTPUT_MARK) is None  # Slicer writes a header of its own

    kept = apply_classifier_to_files(path, tmp_path, tmp_path / "out")
    again = apply_classifier_to_files(path, tmp_path, tmp_path / "out", overwrite=True)

    assert [item.status for item in kept.items] == ["failed", "existing"]  # not reported as the classifier's result
    assert [item.status for item in again.items] == ["failed", "segmented"]
    for item in (kept.items[0], again.items[0]):
        assert "saved again from Slicer" in item.error and "it is kept" in item.error and "move it away" in item.error
    assert edited.read_bytes() == corrected
    assert header_field(untouched, OUTPUT_MARK) is not None


def test_an_output_saved_from_slicer_with_overlapping_segments_is_kept_with_advice_that_keeps_it(
        trained, tmp_path, mrml_scene):
    import slicer

    from FetalAnnotateLib.batch import apply_classifier_to_files

    path, _, second = trained
    write_image(tmp_path / "case.nrrd", second.image, second.spacing)
    output = apply_classifier_to_files(path, tmp_path, tmp_path / "out").items[0].output
    # The user adds a segment that overlaps a class in Slicer and saves: Slicer writes one layer per overlap.
    node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(output))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    overlapping = slicer.vtkSegment()
    overlapping.SetName("fetus, checked")
    labelmap = slicer.vtkOrientedImageData()
    labelmap.DeepCopy(segmentation.GetSegment(segmentation.GetNthSegmentID(1)).GetRepresentation("Binary labelmap"))
    overlapping.AddRepresentation("Binary labelmap", labelmap)
    segmentation.AddSegment(overlapping)
    assert segmentation.GetNumberOfLayers() == 2
    assert storage.WriteData(node)
    corrected = output.read_bytes()

    for overwrite in (False, True):
        item = apply_classifier_to_files(path, tmp_path, tmp_path / "out", overwrite=overwrite).items[0]

        assert item.status == "failed" and item.output is None
        assert "was not written by the batch (saved again from Slicer" in item.error
        assert "it is kept" in item.error and "move it away, or give another --output" in item.error
        assert "delete" not in item.error
    assert output.read_bytes() == corrected


def test_overwrite_replaces_only_outputs_whose_voxels_and_names_are_as_the_batch_wrote_them(trained, tmp_path):
    """Edits with a tool that keeps the header (and so the classifier mark) are the user's work too."""
    import SimpleITK as sitk

    from FetalAnnotateLib.batch import LABELS_MARK, OUTPUT_MARK, apply_classifier_to_files
    from FetalAnnotateLib.segio import header_field

    path, _, second = trained
    for name in ("edited", "renamed", "earlier", "untouched"):
        write_image(tmp_path / f"{name}.nrrd", second.image, second.spacing)
    first = apply_classifier_to_files(path, tmp_path, tmp_path / "out")
    outputs = {item.source.stem: item.output for item in first.items}
    assert all(header_field(output, LABELS_MARK) is not None for output in outputs.values())
    # A correction with SimpleITK that copies the header: ten voxels of the second class given to the first.
    image = sitk.ReadImage(str(outputs["edited"]))
    labels = sitk.GetArrayFromImage(image)
    labels.reshape(-1)[np.flatnonzero(labels == 2)[:10]] = 1
    corrected = sitk.GetImageFromArray(labels)
    corrected.CopyInformation(image)
    for key in image.GetMetaDataKeys():
        corrected.SetMetaData(key, image.GetMetaData(key))
    sitk.WriteImage(corrected, str(outputs["edited"]), True)
    assert header_field(outputs["edited"], OUTPUT_MARK) is not None
    # A segment renamed in a text editor.
    content = outputs["renamed"].read_bytes()
    outputs["renamed"].write_bytes(content.replace(b"Segment1_Name:=fetus", b"Segment1_Name:=fetus (checked)", 1))
    # What the previous version wrote: the classifier mark but no record of the voxels.
    image = sitk.ReadImage(str(outputs["earlier"]))
    image.EraseMetaData(LABELS_MARK)
    sitk.WriteImage(image, str(outputs["earlier"]), True)
    before = {name: outputs[name].read_bytes() for name in ("edited", "renamed", "earlier")}

    kept = {item.source.stem: item for item in apply_classifier_to_files(path, tmp_path, tmp_path / "out").items}
    again = {item.source.stem: item
             for item in apply_classifier_to_files(path, tmp_path, tmp_path / "out", overwrite=True).items}

    assert {name: item.status for name, item in kept.items()} == {
        "edited": "failed", "renamed": "failed", "earlier": "existing", "untouched": "existing"}
    assert {name: item.status for name, item in again.items()} == {
        "edited": "failed", "renamed": "failed", "earlier": "failed", "untouched": "segmented"}
    for name in ("edited", "renamed"):
        assert "was changed since the batch wrote it (its segment names or voxels differ)" in kept[name].error
        assert again[name].error == kept[name].error
    assert "may have been corrected since (an earlier version of FetalAnnotate wrote it without recording its " \
           "voxels); it is kept (--overwrite replaces only unedited outputs of the batch): move it away, or give " \
           "another --output, to segment this volume" in again["earlier"].error
    assert {name: outputs[name].read_bytes() for name in before} == before


def test_an_existing_output_is_a_result_only_when_this_classifier_wrote_it_for_this_volume(trained, tmp_path, capsys):
    from FetalAnnotateLib.__main__ import main
    from FetalAnnotateLib.batch import apply_classifier_to_files
    from FetalAnnotateLib.classifier_io import save_classifier
    from FetalAnnotateLib.phantom import example_strokes
    from FetalAnnotateLib.segio import write_segmentation

    path, classifier, second = trained
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    for name in ("other", "moved", "resized", "same", "strokes"):
        write_image(inputs / f"{name}.nrrd", second.image, second.spacing)
    another = save_classifier(tmp_path / "another.skops", classifier, ["background", "fetus", "placenta"],
                              metadata={"seed": 2})  # the same class names
    apply_classifier_to_files(another, inputs / "other.nrrd", out)
    apply_classifier_to_files(path, [inputs / "moved.nrrd", inputs / "resized.nrrd", inputs / "same.nrrd"], out)
    write_image(inputs / "moved.nrrd", second.image, second.spacing, origin=(40.0, -3.0, 12.0))
    write_image(inputs / "resized.nrrd", second.image[:, :40].copy(), second.spacing)
    strokes = write_segmentation(out / "strokes.seg.nrrd", example_strokes(second.label_map),
                                 ["background", "fetus", "placenta"], spacing=second.spacing)
    painted = strokes.read_bytes()
    apply = ["apply", "--classifier", str(path), "--output", str(out), str(inputs)]

    assert main(apply) == 1

    report = json.loads((out / "fetalannotate-report.json").read_text())
    items = {Path(entry["source"]).stem: entry for entry in report["items"]}
    assert {name: entry["status"] for name, entry in items.items()} == {
        "other": "failed", "moved": "failed", "resized": "failed", "same": "existing", "strokes": "failed"}
    assert all(entry["classes"] == {} for name, entry in items.items() if name != "same")
    assert items["other"]["error"] == f"{out / 'other.seg.nrrd'} was written by another classifier: give " \
                                      "--overwrite to replace it, or another --output"
    assert items["moved"]["error"].endswith("was written for a volume at another position or orientation: give "
                                            "--overwrite to replace it, or another --output")
    assert "was written for (8, 48, 48) voxels of (" in items["resized"]["error"]
    assert "but the volume has (8, 40, 48) of (" in items["resized"]["error"]
    assert "strokes.seg.nrrd was not written by the batch" in items["strokes"]["error"]
    assert "it is kept" in items["strokes"]["error"]
    err = capsys.readouterr().err
    assert err.count("FAILED") == 4 and "kept existing" in err

    assert main(apply + ["--overwrite"]) == 1

    report = json.loads((out / "fetalannotate-report.json").read_text())
    assert [(Path(entry["source"]).stem, entry["status"]) for entry in report["items"]] == [
        ("moved", "segmented"), ("other", "segmented"), ("resized", "segmented"), ("same", "segmented"),
        ("strokes", "failed")]
    assert strokes.read_bytes() == painted
    assert main(apply) == 1  # the strokes remain; the others are this classifier's results now
    assert capsys.readouterr().err.count("kept existing") == 4


def test_an_output_that_appears_or_changes_while_its_volume_is_segmented_is_kept(trained, tmp_path):
    from FetalAnnotateLib.batch import apply_classifier_to_files

    path, _, second = trained
    write_image(tmp_path / "case.nrrd", second.image, second.spacing)
    output = tmp_path / "out" / "case.seg.nrrd"

    def save_there_while_predicting(fraction, message):
        if "predicting" in message:
            output.write_bytes(b"the user's file, or another run's output")
        return False

    for overwrite in (False, True):  # first no output yet, then an unedited one to replace
        item = apply_classifier_to_files(path, tmp_path / "case.nrrd", tmp_path / "out", overwrite=overwrite,
                                         progress=save_there_while_predicting).items[0]

        assert item.status == "failed"
        assert item.error == f"{output} was written or changed by another program or run while this volume was " \
                             "segmented; it is kept: run the same command again to check it"
        assert output.read_bytes() == b"the user's file, or another run's output"
        apply_classifier_to_files(path, tmp_path / "case.nrrd", tmp_path / "other")
        output.write_bytes((tmp_path / "other" / "case.seg.nrrd").read_bytes())

    # A second run of the same batch that finished this volume first: its output is the result.
    output.unlink()
    finished = (tmp_path / "other" / "case.seg.nrrd").read_bytes()

    def finish_there_while_predicting(fraction, message):
        if "predicting" in message and not output.exists():
            output.write_bytes(finished)
        return False

    item = apply_classifier_to_files(path, tmp_path / "case.nrrd", tmp_path / "out",
                                     progress=finish_there_while_predicting).items[0]
    assert item.status == "existing" and item.error is None and output.read_bytes() == finished


def test_a_damaged_existing_output_fails_its_item_only_and_is_kept(trained, tmp_path):
    from FetalAnnotateLib.batch import apply_classifier_to_files

    path, _, second = trained
    for name in ("a", "b", "c"):
        write_image(tmp_path / f"{name}.nrrd", second.image, second.spacing)
    first = apply_classifier_to_files(path, tmp_path, tmp_path / "out")
    truncated, bad_label = first.items[0].output, first.items[1].output
    truncated.write_bytes(truncated.read_bytes()[:-200])
    header = bad_label.read_bytes()
    bad_label.write_bytes(header.replace(b"Segment0_LabelValue:=1", b"Segment0_LabelValue:=one", 1))
    damaged = truncated.read_bytes(), bad_label.read_bytes()

    for overwrite in (False, True):
        again = apply_classifier_to_files(path, tmp_path, tmp_path / "out", overwrite=overwrite)

        assert [item.status for item in again.items] == ["failed", "failed", "segmented" if overwrite else "existing"]
        assert all("cannot be read (" in item.error and "it is kept" in item.error for item in again.items[:2])
        assert (truncated.read_bytes(), bad_label.read_bytes()) == damaged


def test_an_interrupted_write_leaves_no_file_and_a_cancelled_batch_resumes(trained, tmp_path, monkeypatch):
    import SimpleITK as sitk

    from FetalAnnotateLib.batch import BatchCancelled, apply_classifier_to_files
    from FetalAnnotateLib.segio import write_segmentation

    path, _, second = trained
    real_write = sitk.WriteImage

    def write_half_then_fail(image, name, *args, **kwargs):
        with open(name, "wb") as stream:
            stream.write(b"NRRD0004\n half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(sitk, "WriteImage", write_half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        write_segmentation(tmp_path / "x.seg.nrrd", second.label_map, ["a", "b", "c"])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(sitk, "WriteImage", real_write)

    for index in range(3):
        write_image(tmp_path / f"case{index}.nrrd", second.image, second.spacing)
    seen = []

    def cancel_in_the_second_volume(fraction, message):
        seen.append(message)
        return message.startswith("case1.nrrd: predicting")

    with pytest.raises(BatchCancelled, match="1 of 3 volumes segmented") as cancelled:
        apply_classifier_to_files(path, tmp_path, tmp_path / "out", progress=cancel_in_the_second_volume)

    assert [(item.source.name, item.status) for item in cancelled.value.result.items] == [("case0.nrrd", "segmented")]
    assert sorted(child.name for child in (tmp_path / "out").iterdir()) == [
        "case0.seg.nrrd", "fetalannotate-report.csv", "fetalannotate-report.json"]
    _, leftover = start_writer(tmp_path / "out" / "case1.seg.nrrd", killed=True)
    assert leftover.exists()
    resumed = apply_classifier_to_files(path, tmp_path, tmp_path / "out")
    assert [item.status for item in resumed.items] == ["existing", "segmented", "segmented"]
    assert not any(child.name.startswith(".") for child in (tmp_path / "out").iterdir())


def test_shards_partition_the_inputs():
    from FetalAnnotateLib import FetalAnnotateError
    from FetalAnnotateLib.batch import shard_of

    volumes = [f"case{index:02d}" for index in range(11)]
    shards = [shard_of(volumes, (index, 3)) for index in (1, 2, 3)]
    assert sorted(sum(shards, [])) == volumes
    assert [len(shard) for shard in shards] == [4, 4, 3]
    assert shard_of(volumes, None) == volumes
    with pytest.raises(FetalAnnotateError, match="shard 4/3 does not exist"):
        shard_of(volumes, (4, 3))


def test_workers_and_shards_give_the_same_outputs_and_a_true_report(trained, tmp_path):
    import SimpleITK as sitk

    from FetalAnnotateLib.batch import apply_classifier_to_files

    path, _, second = trained
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for index in range(4):
        write_image(inputs / f"case{index}.nii.gz", np.roll(second.image, 3 * index, axis=2),
                    (second.spacing[0], second.spacing[1] * (1 + index / 10), second.spacing[2]))
    single = apply_classifier_to_files(path, inputs, tmp_path / "single")
    lines = []
    parallel = apply_classifier_to_files(path, inputs, tmp_path / "parallel", jobs=2, memory_budget=2**40,
                                         log=lines.append)
    shards = [apply_classifier_to_files(path, inputs, tmp_path / "sharded", shard=(index, 3)) for index in (1, 2, 3)]

    names = sorted(child.name for child in (tmp_path / "single").glob("*.seg.nrrd"))
    assert names == [f"case{index}.seg.nrrd" for index in range(4)]
    for name in names:
        np.testing.assert_array_equal(labels_of(tmp_path / "parallel" / name), labels_of(tmp_path / "single" / name))
        np.testing.assert_array_equal(labels_of(tmp_path / "sharded" / name), labels_of(tmp_path / "single" / name))
    assert sorted(item.source.name for shard in shards for item in shard.items) == \
        sorted(item.source.name for item in single.items)
    assert shards[1].report_csv.name == "fetalannotate-report-shard-2-of-3.csv"
    assert "2 of --jobs 2 at once" in lines[0]
    assert [item.voxels for item in parallel.items] == [item.voxels for item in single.items]

    with open(single.report_csv, newline="") as stream:
        rows = list(csv.DictReader(stream))
    report = json.loads(single.report_json.read_text())
    assert report["classifier_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert {"python", "fetalannotate", "numpy", "scikit-learn", "SimpleITK"} <= set(report["versions"])
    assert len(rows) == len(report["items"]) == 4
    for row, entry in zip(rows, report["items"]):
        image = sitk.ReadImage(row["output"])
        labels = sitk.GetArrayFromImage(image)
        voxel_ml = np.prod(image.GetSpacing()) / 1000
        for value, name in enumerate(report["class_names"], start=1):
            count = int(np.count_nonzero(labels == value))
            assert int(row[f"{name}_voxels"]) == entry["classes"][name]["voxels"] == count
            assert float(row[f"{name}_ml"]) == pytest.approx(count * voxel_ml)
            assert entry["classes"][name]["ml"] == pytest.approx(count * voxel_ml)
        assert row["status"] == entry["status"] == "segmented"


def test_the_memory_budget_respects_a_container_or_slurm_job_limit(tmp_path):
    from FetalAnnotateLib.batch import _cgroup_memory_left

    (tmp_path / "v2.txt").write_text("0::/slurm/uid_1000/job_7/step_0\n")
    job = tmp_path / "slurm" / "uid_1000" / "job_7" / "step_0"
    job.mkdir(parents=True)
    (job / "memory.max").write_text(f"{16 * 2**30}\n")
    (job / "memory.current").write_text(f"{2**30}\n")
    assert _cgroup_memory_left(tmp_path / "v2.txt", tmp_path) == 15 * 2**30
    (job / "memory.max").write_text("max\n")
    assert _cgroup_memory_left(tmp_path / "v2.txt", tmp_path) is None

    (tmp_path / "v1.txt").write_text("5:cpu:/\n4:memory:/docker/abc\n")
    (tmp_path / "memory").mkdir()  # a container sees its own group as the root
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{4 * 2**30}\n")
    (tmp_path / "memory" / "memory.usage_in_bytes").write_text(f"{5 * 2**30}\n")
    assert _cgroup_memory_left(tmp_path / "v1.txt", tmp_path) == 0


def test_worker_processes_are_refused_inside_the_slicer_application(trained, tmp_path, monkeypatch):
    """Worker processes start from sys.executable, which must be a Python executable (the other case, slicer.app
    present, needs the application)."""
    from FetalAnnotateLib import FetalAnnotateError
    from FetalAnnotateLib.batch import apply_classifier_to_files

    path, _, second = trained
    write_image(tmp_path / "case.nrrd", second.image, second.spacing)
    monkeypatch.setattr(sys, "executable", "/opt/Slicer-5.8.1/bin/SlicerApp-real")
    with pytest.raises(FetalAnnotateError, match="inside Slicer use jobs=1"):
        apply_classifier_to_files(path, tmp_path / "case.nrrd", tmp_path / "out", jobs=2)
    assert not (tmp_path / "out").exists()


def test_hand_edited_classifier_settings_are_refused_at_load(trained, tmp_path):
    from FetalAnnotateLib import PixelClassifier
    from FetalAnnotateLib.batch import apply_classifier_to_files
    from FetalAnnotateLib.classifier_io import ClassifierFileError, load_classifier, save_classifier

    path, classifier, second = trained
    write_image(tmp_path / "case.nrrd", second.image, second.spacing)
    good = dict(classifier.feature_settings)
    missing = {key: value for key, value in good.items() if key != "scales_mm"}
    edits = [
        (missing, "'scales_mm' is missing"),
        (dict(good, scales_mm="1, 2, 4, 8"), "'scales_mm' is '1, 2, 4, 8', not a non-empty list"),
        (dict(good, filters=["gaussian", "sobel"]), "unknown filter 'sobel'"),
        (dict(good, intensity="yes"), "'intensity' is 'yes', not true or false"),
        (dict(good, scales_mm=[1.0, 2.0]), "they give 9 features per voxel but the forest was trained on 17"),
        (dict(good, preset="fast"), "preset 'fast' is not one of"),
        (dict(good, scale_mm=[1.0]), r"unknown keys \['scale_mm'\]"),
    ]
    for index, (settings, message) in enumerate(edits):
        edited = save_classifier(tmp_path / f"edited{index}.skops",
                                 PixelClassifier(settings, classifier.forest, classifier.classes), ["a", "b", "c"])
        with pytest.raises(ClassifierFileError, match=f"invalid feature settings: {message}"):
            load_classifier(edited)
        with pytest.raises(ClassifierFileError, match="save the classifier again"):
            apply_classifier_to_files(edited, tmp_path / "case.nrrd", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert load_classifier(path).classifier.feature_settings == good


def test_a_classifier_with_extra_feature_channels_gets_them_per_volume(tmp_path):
    import SimpleITK as sitk

    from FetalAnnotateLib import AnnotationSession, FetalAnnotateError
    from FetalAnnotateLib.batch import apply_classifier_to_files
    from FetalAnnotateLib.classifier_io import save_classifier
    from FetalAnnotateLib.phantom import example_strokes, make_phantom

    def channels(image):
        return np.stack([np.sqrt(np.abs(image)), image[:, ::-1].copy()])

    def write_features(path, array, spacing):
        features = sitk.GetImageFromArray(np.moveaxis(array, 0, -1).astype(np.float32), isVector=True)
        features.SetSpacing([float(s) for s in spacing[::-1]])
        sitk.WriteImage(features, str(path))

    first = make_phantom(shape=(8, 40, 40), seed=2)
    session = AnnotationSession(first.image, first.spacing, extra_features=channels(first.image))
    session.update(example_strokes(first.label_map))
    classifier = session.pixel_classifier()
    path = save_classifier(tmp_path / "extra.skops", classifier, ["background", "fetus", "placenta"])
    second = make_phantom(shape=(8, 40, 40), seed=3)
    (tmp_path / "volumes").mkdir()
    (tmp_path / "features").mkdir()
    write_image(tmp_path / "volumes" / "case.nrrd", second.image, second.spacing)
    write_image(tmp_path / "volumes" / "other.nrrd", second.image, second.spacing)
    write_features(tmp_path / "features" / "case_features.nrrd", channels(second.image), second.spacing)

    with pytest.raises(FetalAnnotateError, match="trained with 2 extra feature channels; give each volume's "
                                                 "feature volume .* with --extra-features"):
        apply_classifier_to_files(path, tmp_path / "volumes", tmp_path / "out")
    assert not (tmp_path / "out").exists()

    result = apply_classifier_to_files(path, tmp_path / "volumes", tmp_path / "out",
                                       extra_features=str(tmp_path / "features" / "{name}_features.nrrd"))

    case, other = result.items
    expected = np.argmax(classifier.predict_proba(second.image, second.spacing,
                                                  extra_features=channels(second.image)), axis=0) + 1
    np.testing.assert_array_equal(labels_of(case.output), expected)
    assert other.status == "failed" and "other_features.nrrd does not exist" in other.error


def test_file_list_inputs_are_relative_to_the_list(tmp_path):
    from FetalAnnotateLib.batch import read_file_list

    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "cases.txt").write_text("# cases of site A\n../a.nii.gz\n\n  /data/b.nrrd  \n")
    assert read_file_list(tmp_path / "lists" / "cases.txt") == [tmp_path / "lists" / "../a.nii.gz",
                                                                 tmp_path / "lists" / "/data/b.nrrd"]


def test_a_file_list_saved_with_a_byte_order_mark_or_not_as_utf8(tmp_path):
    from FetalAnnotateLib import FetalAnnotateError
    from FetalAnnotateLib.batch import read_file_list

    (tmp_path / "notepad.txt").write_bytes("\ufeffcaf\u00e9.nii.gz\r\n# comment\r\nb.nrrd\r\n".encode("utf-8"))
    assert read_file_list(tmp_path / "notepad.txt") == [tmp_path / "caf\u00e9.nii.gz", tmp_path / "b.nrrd"]
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9.nii.gz\n".encode("latin-1"))
    with pytest.raises(FetalAnnotateError, match="latin1.txt is not UTF-8 text .*; save it as UTF-8"):
        read_file_list(tmp_path / "latin1.txt")


def test_feature_volume_reader_and_atomic_path(tmp_path):
    from FetalAnnotateLib import FetalAnnotateError
    from FetalAnnotateLib.segio import atomic_path, read_feature_volume

    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "report.csv") as temporary:
            assert Path(temporary).name.startswith(f".report.csv.{os.getpid()}@{socket.gethostname()[:32]}.")
            assert temporary.endswith(".partial.csv")
            open(temporary, "w").write("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FetalAnnotateError, match="the temporary file .* was removed while report.csv was written "
                                                 r"\(by another program or run cleaning the folder\?\); .*report.csv "
                                                 "was not written: run again"):
        with atomic_path(tmp_path / "report.csv") as temporary:
            open(temporary, "w").write("whole")
            os.remove(temporary)  # as another program cleaning the folder would
    assert list(tmp_path.iterdir()) == []
    write_image(tmp_path / "one.nrrd", np.ones((3, 4, 5), np.float32), (2.0, 1.0, 1.0))
    assert read_feature_volume(tmp_path / "one.nrrd").array.shape == (1, 3, 4, 5)


def test_command_line_exit_codes_messages_and_file_list(trained, tmp_path, capsys):
    from FetalAnnotateLib.__main__ import main

    path, _, second = trained
    (tmp_path / "inputs").mkdir()
    write_image(tmp_path / "inputs" / "case.nrrd", second.image, second.spacing)
    (tmp_path / "empty").mkdir()
    apply = ["apply", "--classifier", str(path), "--output"]

    assert main(apply + [str(tmp_path / "out"), str(tmp_path / "inputs")]) == 0
    assert main(apply + [str(tmp_path / "out"), str(tmp_path / "empty")]) == 2
    assert main(apply + [str(tmp_path / "result.nii.gz"), str(tmp_path / "inputs")]) == 2
    assert not (tmp_path / "result.nii.gz").exists()
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "error: no image volume to segment in" in captured.err
    assert "looks like a file name; give a folder" in captured.err
    assert "memory budget" in captured.err and "1 of 1 volumes done (0 kept from before), 0 failed" in captured.err

    (tmp_path / "inputs" / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 not gzip")
    (tmp_path / "list.txt").write_text("inputs/case.nrrd\ninputs/broken.nii.gz\n", encoding="utf-8-sig")
    assert main(apply + [str(tmp_path / "out"), "--file-list", str(tmp_path / "list.txt")]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.err and "kept existing" in captured.err and "Traceback" not in captured.err
    assert main(apply + [str(tmp_path / "out2"), str(tmp_path / "empty"), "--verbose"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main(["apply", "--classifier", str(path), "--output", str(tmp_path / "out3")]) == 2
    assert "error: give input volumes or folders, or --file-list" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(apply + [str(tmp_path / "out3"), str(tmp_path / "inputs"), "--shard", "4/3"])
    assert usage.value.code == 2 and "shard 4/3 does not exist" in capsys.readouterr().err


def test_progress_is_a_bar_with_eta_on_a_terminal_and_plain_lines_when_piped():
    import io

    from FetalAnnotateLib.__main__ import ProgressDisplay

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    piped = io.StringIO()
    display = ProgressDisplay(piped)
    display.progress(0.0, "case1: features")
    display.log("segmented case1")
    display.progress(1.0, "done")
    assert piped.getvalue() == "segmented case1\n"

    terminal = Terminal()
    display = ProgressDisplay(terminal)
    display.progress(0.0, "case1: features")
    display.progress(0.5, "case2: predicting")
    display.progress(1.0, "done")
    display.close()
    assert "\r\x1b[K[########################] 100% ETA 00:00  done" in terminal.getvalue()


def test_only_leftovers_of_interrupted_writes_of_the_same_output_are_removed(trained, tmp_path):
    from FetalAnnotateLib.batch import apply_classifier_to_files
    from FetalAnnotateLib.segio import LEFTOVER_AGE_S

    path, _, second = trained
    write_image(tmp_path / "case[1].nrrd", second.image, second.spacing)
    out = tmp_path / "out"
    out.mkdir()
    _, own = start_writer(out / "case[1].seg.nrrd", killed=True)
    # What a glob bracket would match: a leftover of volume "case1" (e.g. of another shard) is not this output's.
    _, other = start_writer(out / "case1.seg.nrrd", killed=True)
    # Without a writer of this computer (an earlier version's, or a run on another computer sharing the folder):
    # left over only when it has not changed for a day.
    old, recent, elsewhere = (out / f".case[1].seg.nrrd.{writer}.partial.seg.nrrd"
                              for writer in ("x1y2z3", "a1b2c3", "7@another-computer.lab.org.d4e5f6"))
    for leftover in (old, recent, elsewhere):
        leftover.write_bytes(b"left by a killed run, or being written")
    a_day_ago = time.time() - LEFTOVER_AGE_S - 60
    os.utime(old, (a_day_ago, a_day_ago))

    apply_classifier_to_files(path, tmp_path / "case[1].nrrd", out)

    assert not own.exists() and not old.exists()
    assert other.exists() and recent.exists() and elsewhere.exists()


def test_a_write_in_progress_of_another_run_into_the_same_folder_is_left_alone(trained, tmp_path):
    from FetalAnnotateLib.batch import apply_classifier_to_files

    path, _, second = trained
    write_image(tmp_path / "case.nrrd", second.image, second.spacing)
    out = tmp_path / "out"
    writer, temporary = start_writer(out / "case.seg.nrrd", killed=False)
    try:
        result = apply_classifier_to_files(path, tmp_path / "case.nrrd", out)
        assert temporary.exists()
    finally:
        writer.communicate("finish\n", timeout=60)

    assert writer.returncode == 0 and not temporary.exists()
    assert result.items[0].status == "segmented"
    assert not glob.glob(glob.escape(str(out)) + "/.*")


@pytest.mark.parametrize("flag", [b"CompressedData = true", b"CompressedData=True", b"CompressedData = 1"])
def test_compressed_metaimage_headers_in_any_spelling_metaio_reads_are_accepted(tmp_path, flag):
    import SimpleITK as sitk

    from FetalAnnotateLib.segio import VolumeFileError, check_volume_file, read_volume

    array = np.arange(8 * 16 * 16, dtype=np.float32).reshape(8, 16, 16)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "written.mha"), useCompression=True)
    data = (tmp_path / "written.mha").read_bytes()
    assert b"CompressedData = True\n" in data
    (tmp_path / "case.mha").write_bytes(data.replace(b"CompressedData = True", flag))
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "case.mha"))), array)

    check_volume_file(tmp_path / "case.mha")
    assert np.array_equal(read_volume(tmp_path / "case.mha").array, array)
    (tmp_path / "cut.mha").write_bytes((tmp_path / "case.mha").read_bytes()[:-100])
    with pytest.raises(VolumeFileError, match="truncated"):
        check_volume_file(tmp_path / "cut.mha")


def test_an_interrupted_classifier_save_keeps_the_previous_file(trained, tmp_path, monkeypatch):
    import skops.io

    from FetalAnnotateLib.classifier_io import load_classifier, save_classifier

    path, classifier, _ = trained
    saved = save_classifier(tmp_path / "model.skops", classifier, ["background", "fetus", "placenta"])
    before = saved.read_bytes()

    def write_half_then_fail(content, file, **kwargs):
        with open(file, "wb") as stream:
            stream.write(before[: len(before) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(skops.io, "dump", write_half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save_classifier(saved, classifier, ["background", "fetus", "placenta"])

    assert saved.read_bytes() == before and load_classifier(saved).class_names == ("background", "fetus", "placenta")
    assert [child.name for child in tmp_path.iterdir()] == ["model.skops"]
