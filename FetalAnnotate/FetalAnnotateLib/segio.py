"""Volume and segmentation files without Slicer: read NIfTI/NRRD/DICOM, write Slicer ``.seg.nrrd``.

Geometry follows ITK's convention (the one NIfTI/NRRD/DICOM readers return): ``origin`` is the
(x, y, z) position of the first voxel and ``direction`` the 3x3 matrix of the voxel axes (columns
i, j, k) in LPS patient coordinates. Arrays are indexed (z, y, x) and ``spacing`` is in the same
(z, y, x) order, as everywhere else in FetalAnnotateLib.

A ``.seg.nrrd`` written here is what Slicer's Segmentations module saves: a 3D label map whose
header carries the reference geometry and, per segment, Slicer's ``Segment<N>_*`` keys (ID, name,
color, label value, layer, extent), so Slicer loads it as a segmentation node with named, colored
segments.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .validation import FetalAnnotateError

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")

# Distinct, colour-blind friendly colours (RGB in [0, 1]) for segments without a given colour.
DEFAULT_SEGMENT_COLORS = (
    (0.90, 0.62, 0.00), (0.34, 0.71, 0.91), (0.00, 0.62, 0.45), (0.94, 0.89, 0.26),
    (0.00, 0.45, 0.70), (0.84, 0.37, 0.00), (0.80, 0.47, 0.65), (0.60, 0.60, 0.60),
)


class VolumeFileError(FetalAnnotateError):
    """A volume or segmentation file cannot be read or written."""


@dataclass(frozen=True)
class VolumeData:
    """A scalar volume read from disk.

    Attributes
    ----------
    array : ndarray, shape (z, y, x), float32
        Voxel intensities.
    spacing : tuple of float
        Voxel size in mm, (z, y, x) order.
    origin : tuple of float
        LPS position (x, y, z) of voxel (0, 0, 0) in mm.
    direction : ndarray, shape (3, 3)
        LPS directions of the i, j, k (x, y, z) voxel axes, as columns.
    name : str
        File or folder name without its extension.
    """

    array: np.ndarray
    spacing: tuple
    origin: tuple
    direction: np.ndarray
    name: str


def volume_name(path):
    """File name of ``path`` without its volume extension (``a.nii.gz`` -> ``a``)."""
    name = Path(path).name
    for suffix in sorted(VOLUME_SUFFIXES + (".seg.nrrd",), key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_volume_file(path):
    """True for files whose extension is a readable volume format (not a ``.seg.nrrd``)."""
    name = Path(path).name.lower()
    return Path(path).is_file() and name.endswith(VOLUME_SUFFIXES) and not name.endswith(".seg.nrrd")


def is_dicom_folder(path):
    """True for a folder that holds at least one DICOM series."""
    import SimpleITK as sitk

    return Path(path).is_dir() and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def read_volume(path):
    """Read a NIfTI/NRRD/MetaImage file or a DICOM series folder.

    Parameters
    ----------
    path : str or Path
        A volume file, or a folder holding one DICOM series (the largest series is read when
        the folder holds several).

    Returns
    -------
    VolumeData
        Intensities as float32 (z, y, x) with spacing, LPS origin and direction.

    Raises
    ------
    VolumeFileError
        If the path does not exist, is not a readable volume, or is not a scalar 3D/2D image.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise VolumeFileError(f"{path} does not exist; give a NIfTI/NRRD file or a DICOM folder")
    try:
        if path.is_dir():
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise VolumeFileError(f"{path} is a folder without DICOM series; give a DICOM series folder")
            files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), uid) for uid in series), key=len)
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise VolumeFileError(f"cannot read {path} as a volume: {error}") from error
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeFileError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                              "convert it to a scalar (grayscale) volume first")
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if image.GetDimension() != 3:
        raise VolumeFileError(f"{path} is a {image.GetDimension()}D image; only 2D and 3D volumes are supported")
    return VolumeData(
        array=sitk.GetArrayFromImage(image).astype(np.float32),
        spacing=tuple(float(s) for s in image.GetSpacing()[::-1]),
        origin=tuple(float(o) for o in image.GetOrigin()),
        direction=np.asarray(image.GetDirection(), float).reshape(3, 3),
        name=volume_name(path),
    )


def write_segmentation(path, labels, segment_names, *, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                       direction=None, colors=None, segment_ids=None):
    """Write a label map as a Slicer ``.seg.nrrd`` with one named segment per label value.

    Parameters
    ----------
    path : str or Path
        Output file; should end in ``.seg.nrrd`` so Slicer loads it as a segmentation.
    labels : ndarray of int, shape (z, y, x)
        0 is empty; value k (1 <= k <= len(segment_names)) belongs to segment k.
    segment_names : sequence of str
        Name of the segment of label value 1, 2, ...
    spacing : tuple of float
        Voxel size in mm, (z, y, x).
    origin : tuple of float
        LPS position (x, y, z) of voxel (0, 0, 0).
    direction : array_like, shape (3, 3), optional
        LPS directions of the voxel axes as columns; identity when omitted.
    colors : sequence of (r, g, b), optional
        Segment colors in [0, 1]; a default palette when omitted.
    segment_ids : sequence of str, optional
        Segment IDs; ``Segment_<k>`` when omitted.

    Returns
    -------
    Path
        The written file.
    """
    import SimpleITK as sitk

    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.dtype.kind not in "biu":
        raise VolumeFileError(f"labels must be a 3D integer array, got {labels.dtype} of shape {labels.shape}")
    names = [str(name) for name in segment_names]
    if labels.size and int(labels.max()) > len(names):
        raise VolumeFileError(f"label value {int(labels.max())} has no segment name ({len(names)} names given)")
    if colors is None:
        colors = [DEFAULT_SEGMENT_COLORS[index % len(DEFAULT_SEGMENT_COLORS)] for index in range(len(names))]
    if segment_ids is None:
        segment_ids = [f"Segment_{index + 1}" for index in range(len(names))]
    if len(colors) != len(names) or len(segment_ids) != len(names):
        raise VolumeFileError("give one color and one segment ID per segment name")

    image = sitk.GetImageFromArray(labels.astype(np.uint8 if len(names) < 256 else np.uint16))
    image.SetSpacing([float(s) for s in spacing[::-1]])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection((np.eye(3) if direction is None else np.asarray(direction, float)).ravel().tolist())
    header = {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for index, (segment_id, name, color) in enumerate(zip(segment_ids, names, colors)):
        header.update({
            f"Segment{index}_ID": str(segment_id),
            f"Segment{index}_Name": name,
            f"Segment{index}_NameAutoGenerated": "0",
            f"Segment{index}_Color": " ".join(f"{float(c):.6g}" for c in color),
            f"Segment{index}_ColorAutoGenerated": "0",
            f"Segment{index}_LabelValue": str(index + 1),
            f"Segment{index}_Layer": "0",
            f"Segment{index}_Extent": " ".join(str(v) for v in _label_extent(labels, index + 1)),
            f"Segment{index}_Tags": "|",
        })
    for key, value in header.items():
        image.SetMetaData(key, value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def read_segmentation(path):
    """Read a ``.seg.nrrd`` whose segments share one layer (as written by :func:`write_segmentation`).

    Returns
    -------
    labels : ndarray of int, shape (z, y, x)
        Label map; value k belongs to ``names[k - 1]``.
    names : list of str
        Segment names in label-value order.
    """
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise VolumeFileError(f"cannot read {path} as a segmentation: {error}") from error
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeFileError(f"{path} has overlapping segments in several layers; "
                              "export it from Slicer as a single-layer segmentation first")
    segments = {}
    for key in image.GetMetaDataKeys():
        if key.startswith("Segment") and key.endswith("_Name") and key[7:-5].isdigit():
            index = key[7:-5]
            segments[int(image.GetMetaData(f"Segment{index}_LabelValue"))] = image.GetMetaData(key)
    labels = sitk.GetArrayFromImage(image)
    remapped = np.zeros(labels.shape, np.uint16)
    names = []
    for new_value, (value, name) in enumerate(sorted(segments.items()), start=1):
        remapped[labels == value] = new_value
        names.append(name)
    return remapped, names


def _label_extent(labels, value):
    """Slicer's segment extent (x0 x1 y0 y1 z0 z1) of one label value; an empty extent when absent."""
    where = np.nonzero(labels == value)
    if not where[0].size:
        return (0, -1, 0, -1, 0, -1)
    lows, highs = [int(a.min()) for a in where], [int(a.max()) for a in where]
    return (lows[2], highs[2], lows[1], highs[1], lows[0], highs[0])
