"""Apply a saved classifier to many volumes and save one Slicer ``.seg.nrrd`` per volume.

Runs headless (plain Python with FetalAnnotateLib installed) and from Slicer's Python interactor
alike; nothing here needs Slicer.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .classifier_io import load_classifier
from .segio import is_dicom_folder, is_volume_file, read_volume, write_segmentation
from .validation import FetalAnnotateError, OperationCancelled, report_progress


@dataclass(frozen=True)
class BatchItem:
    """Outcome for one input volume.

    Attributes
    ----------
    source : Path
        The input file or DICOM folder.
    output : Path or None
        The written ``.seg.nrrd``; None when the volume failed.
    error : str or None
        Why the volume failed; None on success.
    """

    source: Path
    output: object
    error: object


def find_volumes(inputs):
    """Volume files and DICOM series folders among ``inputs``.

    Parameters
    ----------
    inputs : str, Path or sequence of them
        Files, DICOM series folders, or folders whose volume files (and DICOM sub-folders) are
        taken, sorted by name.

    Returns
    -------
    list of Path
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    found = []
    for entry in map(Path, inputs):
        if entry.is_dir() and not is_dicom_folder(entry):
            found += [child for child in sorted(entry.iterdir()) if is_volume_file(child) or is_dicom_folder(child)]
        elif entry.exists():
            found.append(entry)
        else:
            raise FetalAnnotateError(f"input {entry} does not exist")
    return found


def apply_classifier_to_files(classifier_path, inputs, output_dir, progress=None):
    """Segment every input volume with a saved classifier; write ``<name>.seg.nrrd`` files.

    Each voxel gets the class of highest probability; the output has one segment per class,
    named as in the classifier file, in the input volume's geometry.

    Parameters
    ----------
    classifier_path : str or Path
        A file written by ``save_classifier`` (or the module's "Save classifier").
    inputs : str, Path or sequence of them
        Volume files (NIfTI, NRRD, MetaImage), DICOM series folders, or folders of them.
    output_dir : str or Path
        Folder for the ``.seg.nrrd`` files (created if needed).
    progress : callable, optional
        ``progress(fraction, message) -> bool``; returning True cancels the whole batch.

    Returns
    -------
    list of BatchItem
        One per input volume, in order; a volume that cannot be read or segmented is reported
        in its item's ``error`` and the others are still processed.

    Raises
    ------
    ClassifierFileError
        If the classifier file cannot be loaded.
    OperationCancelled
        If ``progress`` asked to stop.
    """
    saved = load_classifier(classifier_path)
    sources = find_volumes(inputs)
    output_dir = Path(output_dir)
    items = []
    for index, source in enumerate(sources):
        def volume_progress(fraction, message, _index=index, _name=source.name):
            return progress is not None and progress((_index + fraction) / len(sources), f"{_name}: {message}")

        report_progress(progress, index / len(sources), f"reading {source.name}")
        try:
            volume = read_volume(source)
            probabilities = saved.classifier.predict_proba(volume.array, volume.spacing, progress=volume_progress)
            labels = (np.argmax(probabilities, axis=0) + 1).astype(np.uint8)
            output = write_segmentation(output_dir / f"{volume.name}.seg.nrrd", labels, saved.class_names,
                                        spacing=volume.spacing, origin=volume.origin, direction=volume.direction)
            items.append(BatchItem(source, output, None))
        except OperationCancelled:
            raise
        except (FetalAnnotateError, OSError, MemoryError) as error:
            items.append(BatchItem(source, None, str(error)))
    report_progress(progress, 1.0, f"segmented {sum(item.error is None for item in items)} of {len(items)} volumes")
    return items
