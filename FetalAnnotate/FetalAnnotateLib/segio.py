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

import contextlib
import glob
import os
import re
import socket
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .validation import FetalAnnotateError

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Seconds after its last change when a temporary file of :func:`atomic_path` whose writer cannot
#: be checked (another computer's, on a shared folder) counts as left over by an interrupted write.
LEFTOVER_AGE_S = 24 * 3600

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
    array : ndarray, shape (z, y, x)
        Voxel intensities, in the file's voxel type.
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


def not_an_image_volume(path):
    """Why ``path`` is not an image volume to segment, or None when it is one.

    Only the file name and header are read. Refused: files without a volume extension,
    segmentations (``.seg.nrrd`` or a header with Slicer's segmentation keys), probability maps
    (names ending in ``probability``, as FetalAnnotate names them) and multi-component volumes
    (e.g. exported feature volumes). A file whose header cannot be read counts as a volume, so
    that reading it reports the damage.

    Parameters
    ----------
    path : str or Path
        A file or folder.

    Returns
    -------
    str or None
    """
    path = Path(path)
    if path.is_dir():
        return None if is_dicom_folder(path) else "a folder without a DICOM series"
    if path.name.lower().endswith(".seg.nrrd"):
        return "a segmentation (.seg.nrrd)"
    if not is_volume_file(path):
        return "not a volume file (" + ", ".join(VOLUME_SUFFIXES) + ")"
    if volume_name(path).lower().endswith("probability"):
        return "a probability map"
    reader = _header_reader(path)
    if reader is None:
        return None
    if reader.HasMetaDataKey("Segmentation_MasterRepresentation"):
        return "a segmentation (Slicer segmentation header)"
    if reader.GetNumberOfComponents() != 1:
        return f"a volume of {reader.GetNumberOfComponents()} components per voxel (e.g. exported features)"
    return None


def check_volume_file(path):
    """Refuse a truncated or corrupt volume file before an image reader silently pads it.

    A ``.nii.gz`` or gzip-encoded NRRD must hold a complete gzip stream (ended, CRC checked)
    and every file at least the voxel bytes its header announces. Detached data files
    (``.nhdr``, ``.mhd``) and DICOM are left to their readers.

    Parameters
    ----------
    path : str or Path
        A volume file.

    Raises
    ------
    VolumeFileError
        If the data is shorter than its header says or its compressed stream is damaged.
    """
    import SimpleITK as sitk

    path = Path(path)
    name = path.name.lower()
    reader = _volume_header_reader(path)
    component_bytes = sitk.Image([1, 1], reader.GetPixelID(), reader.GetNumberOfComponents()).GetSizeOfPixelComponent()
    if name.endswith((".nii", ".nii.gz")) and reader.HasMetaDataKey("bitpix"):
        # The stored size: ITK reads integers scaled by scl_slope / scl_inter (e.g. dcm2niix's Philips scans) as float.
        component_bytes = min(component_bytes, max(1, int(reader.GetMetaData("bitpix")) // 8))
    voxel_bytes = int(np.prod(reader.GetSize(), dtype=np.int64)) * reader.GetNumberOfComponents() * component_bytes
    with open(path, "rb") as stream:
        head = stream.read(1 << 16)  # NRRD and MetaImage headers are a few lines of text
        if name.endswith((".nii", ".nii.gz")):
            header_bytes, encoding = 0, ("gzip" if name.endswith(".gz") else "raw")
        elif name.endswith(".nrrd"):
            header_bytes, encoding = _nrrd_data_start(head)
        elif name.endswith(".mha"):
            header_bytes, encoding = _metaimage_data_start(head)
        else:
            return
        if encoding == "raw":
            available, first = os.path.getsize(path) - header_bytes, head[header_bytes:]
        elif encoding in ("gzip", "zlib"):
            stream.seek(header_bytes)
            try:
                available, first, complete = _inflated_size(stream, zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
            except zlib.error as error:
                raise VolumeFileError(f"{path} is corrupt ({encoding} data: {error}); "
                                      "copy it again from its source") from error
            if not complete:
                raise VolumeFileError(f"{path} is truncated: its compressed data ends early; "
                                      "copy it again from its source")
        else:
            return
    if name.endswith((".nii", ".nii.gz")):
        voxel_bytes += _nifti_voxel_offset(first)
    if available < voxel_bytes:
        raise VolumeFileError(f"{path} is truncated: it holds {available} of the {voxel_bytes} bytes its header "
                              "announces; copy it again from its source")


def _inflated_size(stream, wbits, keep=540):
    """(decompressed size, its first ``keep`` bytes, whether the stream ended) of a gzip/zlib stream.

    Reads and decompresses in bounded pieces, so a large volume never sits in memory.
    """
    decompressor = zlib.decompressobj(wbits)
    size, first, pending = 0, b"", b""
    while not decompressor.eof:
        pending = pending or stream.read(1 << 20)
        if not pending:
            break
        piece = decompressor.decompress(pending, 1 << 24)
        pending = decompressor.unconsumed_tail
        first += piece[: max(keep - len(first), 0)]
        size += len(piece)
    return size, first, decompressor.eof


def _nifti_voxel_offset(data):
    """Byte offset of the voxels in an uncompressed NIfTI-1 or NIfTI-2 file."""
    for order in "<>":
        if struct.unpack_from(order + "i", data)[0] == 348:
            return int(struct.unpack_from(order + "f", data, 108)[0])
        if struct.unpack_from(order + "i", data)[0] == 540:
            return int(struct.unpack_from(order + "q", data, 168)[0])
    return 348


def _nrrd_data_start(data):
    """(offset of the attached data, encoding) of a NRRD file; encoding None for detached data."""
    end = data.find(b"\n\n")
    fields = {}
    for line in data[:end].decode("latin-1").splitlines()[1:]:
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.lstrip("=").strip().lower()
    if end < 0 or "data file" in fields or "datafile" in fields:
        return 0, None
    encoding = fields.get("encoding", "raw")
    return end + 2, {"raw": "raw", "gzip": "gzip", "gz": "gzip"}.get(encoding)


def _metaimage_data_start(data):
    """(offset of the attached data, encoding) of a ``.mha`` file; encoding None for detached data.

    The header is ``Key = Value`` lines up to ``ElementDataFile``; as in MetaIO, a value
    starting with T, t or 1 is true, with or without spaces around ``=``.
    """
    fields, start = {}, 0
    while b"ElementDataFile" not in fields:
        end = data.find(b"\n", start)
        if end < 0:
            return 0, None
        key, _, value = data[start:end].partition(b"=")
        fields[key.strip()] = value.strip()
        start = end + 1
    if fields[b"ElementDataFile"].upper() != b"LOCAL":
        return 0, None
    compressed = fields.get(b"CompressedData", b"")[:1] in (b"T", b"t", b"1")
    return start, ("zlib" if compressed else "raw")


def is_dicom_folder(path):
    """True for a folder that holds at least one DICOM series."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_dir() or not any(_looks_like_dicom(child) for child in path.iterdir()):
        return False  # spares GDCM scanning (and warning about) folders of other files
    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def _looks_like_dicom(path):
    """A ``.dcm`` file, or one with the DICOM ``DICM`` marker after its 128-byte preamble."""
    if not path.is_file():
        return False
    if path.name.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as stream:
            return stream.read(132)[128:] == b"DICM"
    except OSError:
        return False


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
        Intensities (z, y, x) in the file's voxel type, with spacing, LPS origin and direction.

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
            check_volume_file(path)
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
        array=sitk.GetArrayFromImage(image),
        spacing=tuple(float(s) for s in image.GetSpacing()[::-1]),
        origin=tuple(float(o) for o in image.GetOrigin()),
        direction=np.asarray(image.GetDirection(), float).reshape(3, 3),
        name=volume_name(path),
    )


def read_volume_grid(path):
    """The voxel grid :func:`read_volume` gives a volume, from a file's header alone.

    A DICOM series folder is read whole. The voxels are not checked (:func:`check_volume_file`).

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    shape : tuple of int
        (z, y, x); a 2D image is one slice.
    spacing : tuple of float
        (z, y, x) mm.
    origin : tuple of float
        LPS (x, y, z) mm.
    direction : ndarray, shape (3, 3)

    Raises
    ------
    VolumeFileError
        If the header cannot be read.
    """
    path = Path(path)
    if path.is_dir():
        volume = read_volume(path)
        return volume.array.shape, volume.spacing, volume.origin, volume.direction
    reader = _volume_header_reader(path)
    size, spacing, origin = list(reader.GetSize()), list(reader.GetSpacing()), list(reader.GetOrigin())
    direction = np.asarray(reader.GetDirection(), float).reshape(len(size), len(size))
    if len(size) == 2:  # as sitk.JoinSeries stacks it in read_volume
        size, spacing, origin = size + [1], spacing + [1.0], origin + [0.0]
        direction = np.block([[direction, np.zeros((2, 1))], [np.zeros((1, 2)), np.ones((1, 1))]])
    return (tuple(int(n) for n in size[::-1]), tuple(float(s) for s in spacing[::-1]),
            tuple(float(o) for o in origin), direction)


def read_feature_volume(path):
    """Read a feature volume (a scalar or a vector image, one channel per component).

    Parameters
    ----------
    path : str or Path
        A volume file, e.g. written by FetalInpaint's feature export.

    Returns
    -------
    VolumeData
        ``array`` of shape (channels, z, y, x), float32, with the file's geometry.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise VolumeFileError(f"feature volume {path} does not exist; export the features of this volume first")
    check_volume_file(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise VolumeFileError(f"cannot read {path} as a feature volume: {error}") from error
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    channels = np.moveaxis(array, -1, 0) if image.GetNumberOfComponentsPerPixel() > 1 else array[np.newaxis]
    if image.GetDimension() == 2:
        channels = channels[:, np.newaxis]
    return VolumeData(
        array=channels,
        spacing=tuple(float(s) for s in image.GetSpacing()[::-1]) + (1.0,) * (3 - image.GetDimension()),
        origin=tuple(float(o) for o in image.GetOrigin()),
        direction=np.asarray(image.GetDirection(), float).reshape(image.GetDimension(), image.GetDimension()),
        name=volume_name(path),
    )


def write_segmentation(path, labels, segment_names, *, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                       direction=None, colors=None, segment_ids=None, header=None):
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
    header : dict of str, optional
        More NRRD header fields (e.g. what wrote the file; read them with
        :func:`header_field`).

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
    fields = {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for index, (segment_id, name, color) in enumerate(zip(segment_ids, names, colors)):
        fields.update({
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
    for key, value in {**fields, **(header or {})}.items():
        image.SetMetaData(key, str(value))
    with atomic_path(path) as temporary:
        sitk.WriteImage(image, temporary, useCompression=True)
    return Path(path)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in ``path``'s folder; rename it to ``path`` once the block succeeds.

    An interrupted write leaves a hidden ``.<name>.<pid>@<host>.*.partial<suffix>`` file, never
    a half-written ``path``; the temporary file is removed when the block raises. The writer's
    process ID and computer in the name tell :func:`leftover_partial_files` whether the write
    is still in progress.

    Raises
    ------
    FetalAnnotateError
        If the temporary file was removed (by another program) before it was renamed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}@{_writer_host()}.",
                                         suffix=_partial_suffix(path))
    os.close(handle)
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        yield temporary
        try:
            os.chmod(temporary, 0o666 & ~umask)  # mkstemp's owner-only mode would hide outputs from a lab's group
            os.replace(temporary, path)
        except FileNotFoundError as error:
            raise FetalAnnotateError(f"the temporary file {temporary} was removed while {path.name} was written "
                                     f"(by another program or run cleaning the folder?); {path} was not written: "
                                     "run again") from error
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def leftover_partial_files(path, max_age=LEFTOVER_AGE_S):
    """Temporary files of :func:`atomic_path` for ``path`` that interrupted writes left behind.

    A write in progress is never among them: a temporary file counts when the process that
    wrote it on this computer has ended, or when it has not changed for ``max_age`` seconds
    (the only test for files written on another computer sharing the folder, by earlier
    versions, or on Windows).

    Parameters
    ----------
    path : str or Path
        The file that the interrupted writes were writing.
    max_age : float, default :data:`LEFTOVER_AGE_S`
        Seconds.

    Returns
    -------
    list of Path
    """
    path = Path(path)
    prefix, suffix = f".{path.name}.", _partial_suffix(path)
    leftovers = []
    for candidate in path.parent.glob(glob.escape(prefix) + "*" + glob.escape(suffix)):
        # "<pid>@<host>.<random>" as atomic_path writes it; "<random>" from earlier versions
        writer = re.fullmatch(r"(?:(\d+)@(.+)\.)?\w+", candidate.name[len(prefix):-len(suffix)])
        if writer is None:  # another file's, whose name only starts like these
            continue
        try:
            old = time.time() - candidate.stat().st_mtime > max_age
        except FileNotFoundError:  # renamed or removed since
            continue
        pid, host = writer.groups()
        # On Windows os.kill(pid, 0) would end the process.
        if old or (host == _writer_host() and sys.platform != "win32" and not _process_runs(int(pid))):
            leftovers.append(candidate)
    return leftovers


def _writer_host():
    """This computer's name as temporary names carry it: at most 32 characters, so that a long
    container host name does not push a long volume name past the 255-character name limit."""
    return socket.gethostname()[:32]


def _partial_suffix(path):
    """End of the temporary names of ``path``: ``.partial`` and its extension, since SimpleITK picks the writer
    from the extension."""
    return ".partial" + (path.name[len(volume_name(path)):] or path.suffix)


def _process_runs(pid):
    """True unless process ``pid`` of this computer has ended."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def header_field(path, key):
    """The value of header field ``key`` of an image file (read from the header alone), or None
    when the field is absent or the header cannot be read."""
    reader = _header_reader(path)
    return reader.GetMetaData(key) if reader is not None and reader.HasMetaDataKey(key) else None


def _header_reader(path):
    """A SimpleITK reader that has read the header of ``path``, or None when it cannot."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader


def _volume_header_reader(path):
    """:func:`_header_reader` of a volume file; raises :class:`VolumeFileError` when it cannot be read."""
    reader = _header_reader(path)
    if reader is None:
        raise VolumeFileError(f"cannot read {path} as a volume: SimpleITK cannot read its header")
    return reader


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
