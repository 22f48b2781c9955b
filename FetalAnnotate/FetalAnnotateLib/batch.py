"""Apply a saved classifier to many volumes: one Slicer ``.seg.nrrd`` per volume and a volumetry report.

Runs headless (plain Python with FetalAnnotateLib installed, or ``fetalannotate apply``) and from
Slicer's Python interactor alike; nothing here needs Slicer.

Data safety: an existing output is kept unless ``overwrite`` is given, and reported as this
run's result only when this classifier wrote it for the volume's voxel grid, so running the same
command again continues an interrupted batch; ``overwrite`` replaces only an unedited output of
the batch (its header marks still match its segment names and voxels), never one corrected by
hand or made elsewhere; every file is written under a temporary name and renamed when complete,
and only temporary files of writes that were interrupted are removed; segmentations are never
taken as inputs, so no input is overwritten; inputs whose outputs would collide (also on file
systems that ignore letter case) and an output folder that cannot be written are refused
before any work starts.
"""

import csv
import hashlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
import unicodedata
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np

from .classifier_io import load_classifier
from .segio import (VOLUME_SUFFIXES, atomic_path, check_volume_file, is_dicom_folder, leftover_partial_files,
                    not_an_image_volume, read_feature_volume, read_segmentation, read_volume, read_volume_grid,
                    volume_name, write_segmentation)
from .validation import FetalAnnotateError, OperationCancelled, report_progress

#: Stem of the report files written into the output folder (``.csv`` and ``.json``).
REPORT_NAME = "fetalannotate-report"
#: NRRD header field of every segmentation the batch writes; its value is the classifier's SHA-256.
#: Slicer and other editors write their own header when they save a segmentation, so an output
#: corrected and saved again by hand lacks it, and ``overwrite`` keeps that file.
OUTPUT_MARK = "FetalAnnotate_Classifier_SHA256"
#: NRRD header field of every segmentation the batch writes: the SHA-256 of its segment names and
#: label voxels. An output edited with a tool that keeps the header (e.g. SimpleITK) no longer
#: matches it, and ``overwrite`` keeps that file too.
LABELS_MARK = "FetalAnnotate_Labels_SHA256"
#: Share of the available memory that the default memory budget takes, so the machine stays usable.
DEFAULT_MEMORY_SHARE = 0.5
# A worker process with numpy, scipy, scikit-learn, SimpleITK and a forest loaded.
_WORKER_BYTES = 400 * 2**20


@dataclass(frozen=True)
class BatchItem:
    """Outcome for one input volume.

    Attributes
    ----------
    source : Path
        The input file or DICOM folder.
    output : Path or None
        The ``.seg.nrrd``; None when the volume failed.
    status : str
        ``"segmented"`` (written by this run), ``"existing"`` (this classifier's unedited output
        for the volume was already there and was kept) or ``"failed"`` (also when another file
        is in the output's place: it is kept, and ``error`` says why).
    error : str or None
        Why the volume failed; None otherwise.
    seconds : float
        Time spent on the volume.
    voxels : tuple of int
        Voxels of each class in the output, in the classifier's class order.
    voxel_ml : float
        Volume of one voxel in mL, from the image spacing.
    details : str or None
        Traceback of an unexpected failure (shown with ``--verbose``).
    """

    source: Path
    output: Optional[Path]
    status: str
    error: Optional[str] = None
    seconds: float = 0.0
    voxels: tuple = ()
    voxel_ml: float = 0.0
    details: Optional[str] = None

    @property
    def volumes_ml(self):
        """Volume of each class in mL (voxel count x voxel volume)."""
        return tuple(count * self.voxel_ml for count in self.voxels)


@dataclass(frozen=True)
class BatchResult:
    """Everything a batch run did.

    Attributes
    ----------
    items : tuple of BatchItem
        One per volume of this run (this shard), in sorted input order.
    skipped : tuple of (Path, str)
        Inputs and files of input folders that are not image volumes, with the reason.
    class_names : tuple of str
        The classifier's classes, in the order of ``BatchItem.voxels``.
    report_csv, report_json : Path
        The volumetry report.
    """

    items: tuple
    skipped: tuple
    class_names: tuple
    report_csv: Path
    report_json: Path

    @property
    def failed(self):
        """The items that failed."""
        return [item for item in self.items if item.status == "failed"]


class BatchCancelled(OperationCancelled):
    """The progress callback stopped the batch; ``result`` holds what was done (reported and kept)."""

    def __init__(self, message, result):
        super().__init__(message)
        self.result = result


def find_volumes(inputs):
    """Image volumes among ``inputs``, sorted, and the files of input folders that are not ones.

    Parameters
    ----------
    inputs : str, Path or sequence of them
        Volume files, DICOM series folders, or folders whose volume files and DICOM sub-folders
        are taken.

    Returns
    -------
    volumes : list of Path
        Sorted by path, each once.
    skipped : list of (Path, str)
        Segmentations, probability maps, multi-component volumes and other files found (or
        given), with the reason (see :func:`~FetalAnnotateLib.segio.not_an_image_volume`).
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    candidates = []
    for entry in map(Path, inputs):
        if entry.is_dir() and not is_dicom_folder(entry):
            candidates += [child for child in sorted(entry.iterdir()) if not child.name.startswith(".")]
        elif entry.exists():
            candidates.append(entry)
        else:
            raise FetalAnnotateError(f"input {entry} does not exist")
    volumes, skipped, seen = [], [], set()
    for candidate in candidates:
        reason = not_an_image_volume(candidate)
        if reason is not None:
            skipped.append((candidate, reason))
        elif candidate.resolve() not in seen:
            seen.add(candidate.resolve())
            volumes.append(candidate)
    return sorted(volumes, key=str), skipped


def read_file_list(path):
    """Inputs listed in a UTF-8 text file, one per line (blank lines and ``#`` comments skipped).

    Relative paths are taken from the list file's folder. A byte order mark (as Windows editors
    write) is ignored.

    Returns
    -------
    list of Path
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as error:
        raise FetalAnnotateError(f"cannot read the file list {path}: {error}") from error
    except UnicodeDecodeError as error:
        raise FetalAnnotateError(f"the file list {path} is not UTF-8 text ({error}); save it as UTF-8") from error
    return [path.parent / line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def shard_of(volumes, shard):
    """The volumes of shard ``k`` of ``n`` (1-based): every n-th volume, starting at the k-th.

    The shards of a sorted list are disjoint and together hold every volume, so ``n`` machines
    given the same inputs split them without talking to each other.

    Parameters
    ----------
    volumes : list
    shard : (int, int) or None
        ``(k, n)`` with 1 <= k <= n; None for all volumes.
    """
    if shard is None:
        return list(volumes)
    index, count = shard
    if not 1 <= index <= count:
        raise FetalAnnotateError(f"shard {index}/{count} does not exist; give K/N with 1 <= K <= N")
    return list(volumes)[index - 1::count]


def available_memory():
    """Memory (bytes) that new processes can use now, or None where it cannot be read.

    On Linux the smaller of the system's available memory and what is left under this
    process's cgroup limit (a container's, or a SLURM job's ``--mem``).
    """
    try:
        with open("/proc/meminfo") as meminfo:
            system = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
        left = _cgroup_memory_left()
        return system if left is None else min(system, left)
    except (OSError, StopIteration, ValueError):
        pass
    if sys.platform == "win32":
        import ctypes

        class MemoryStatus(ctypes.Structure):
            _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong), ("total", ctypes.c_ulonglong),
                        ("available", ctypes.c_ulonglong), ("unused", ctypes.c_ulonglong * 5)]

        status = MemoryStatus(length=ctypes.sizeof(MemoryStatus))
        return int(status.available) if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)) else None
    try:  # macOS: physical memory (no cheap "available" figure)
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _cgroup_memory_left(groups_file="/proc/self/cgroup", root=Path("/sys/fs/cgroup")):
    """Bytes left under this process's cgroup memory limit (v2 or v1), or None without a limit."""
    try:
        with open(groups_file) as groups:
            entries = [line.strip().split(":", 2) for line in groups if line.count(":") >= 2]
    except OSError:
        return None
    for _, controllers, group in entries:
        if controllers == "":
            mount, limit_name, usage_name = root, "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            mount, limit_name, usage_name = root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        for folder in (mount / group.lstrip("/"), mount):  # inside a container the group is its root
            try:
                limit = (folder / limit_name).read_text().strip()
                usage = int((folder / usage_name).read_text())
            except (OSError, ValueError):
                continue
            if limit.isdigit() and int(limit) < 2**62:  # "max" or a huge number: no limit
                return max(int(limit) - usage, 0)
            break
    return None


def estimate_memory(source, n_features, n_classes):
    """Peak memory (bytes) of segmenting one volume in a worker process, from its header size.

    The features (float32, ``n_features`` per voxel) dominate; the image, its normalised copy,
    filter temporaries, the class probabilities and the labels add about ``n_classes + 6``
    float32 values and 9 bytes per voxel.
    """
    import SimpleITK as sitk

    source = Path(source)
    try:
        if source.is_dir():
            files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(source), uid)
                         for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(source))), key=len)
            reader = sitk.ImageFileReader()
            reader.SetFileName(files[0])
            reader.ReadImageInformation()
            voxels = int(np.prod(reader.GetSize()[:2])) * len(files)
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(source))
            reader.ReadImageInformation()
            voxels = int(np.prod(reader.GetSize()))
    except (RuntimeError, ValueError):
        voxels = 0  # unreadable: the item fails at once
    return _WORKER_BYTES + voxels * (4 * (n_features + n_classes + 6) + 9)


def apply_classifier_to_files(classifier_path, inputs, output_dir, *, overwrite=False, jobs=1, memory_budget=None,
                              shard=None, extra_features=None, progress=None, log=None):
    """Segment every input volume with a saved classifier; write ``<name>.seg.nrrd`` files and a report.

    Each voxel gets the class of highest probability; the output has one segment per class,
    named as in the classifier file, in the input volume's geometry. The report
    (``fetalannotate-report.csv`` and ``.json`` in ``output_dir``; ``-shard-K-of-N`` added for a
    shard) lists per volume its status, seconds and, per class, the voxel count and volume in
    mL, with the classifier's SHA-256 and the library versions.

    Parameters
    ----------
    classifier_path : str or Path
        A file written by ``save_classifier`` (or the module's "Save classifier").
    inputs : str, Path or sequence of them
        Volume files (NIfTI, NRRD, MetaImage), DICOM series folders, or folders of them. Files
        of a folder that are not image volumes (segmentations, probability maps, feature
        volumes, other files) are listed in ``BatchResult.skipped``.
    output_dir : str or Path
        Folder for the ``.seg.nrrd`` files and the report (created if needed).
    overwrite : bool, default False
        Segment volumes whose output exists again. By default an output is kept: when this
        classifier wrote it for the volume's voxel grid it is reported (status ``"existing"``),
        so a second run continues an interrupted one; otherwise its volume fails with a
        message. Only an unedited output of the batch is replaced: one without
        :data:`OUTPUT_MARK` (saved again from Slicer, or made elsewhere), one whose segment
        names or voxels no longer match :data:`LABELS_MARK` (edited), or one written by a
        version without it, is kept even so, and its volume fails with a message.
    jobs : int, default 1
        Volumes segmented at once, each in its own worker process (1: in this process, which
        is what Slicer's GUI needs). Outputs are the same for any value.
    memory_budget : int, optional
        Bytes that the running volumes may use together (estimated per volume from its size);
        fewer than ``jobs`` run at once when it is short. Default: half the available memory.
    shard : (int, int), optional
        ``(k, n)``: segment only every n-th volume of the sorted inputs, starting at the k-th
        (1-based), so that n machines share a database.
    extra_features : str, optional
        For a classifier trained with extra feature channels: the path of each volume's
        feature volume, with ``{name}`` standing for the volume's name, e.g.
        ``"features/{name}_features.nrrd"``.
    progress : callable, optional
        ``progress(fraction, message) -> bool``; returning True stops the batch (see Raises).
    log : callable, optional
        ``log(line)`` receives one line per event: the memory budget at the start, each
        skipped file and each volume done.

    Returns
    -------
    BatchResult
        A volume that cannot be read or segmented is reported in its item (status
        ``"failed"``) and the others are still processed.

    Raises
    ------
    ClassifierFileError
        If the classifier file cannot be loaded or its settings are invalid.
    FetalAnnotateError
        Before any work, if there is no volume to segment, two inputs would write the same
        output (or outputs whose names differ only in letter case), ``output_dir`` is a file or
        file name or cannot be written, ``jobs`` or ``shard`` are invalid, the extra features do
        not fit the classifier, or ``jobs`` > 1 inside the Slicer application.
    BatchCancelled
        If ``progress`` asked to stop; volumes done so far are kept and reported, and the
        exception's ``result`` lists them.
    """
    log = log or (lambda line: None)
    started = datetime.now(timezone.utc)
    saved = load_classifier(classifier_path)
    digest = hashlib.sha256(Path(classifier_path).read_bytes()).hexdigest()
    n_extra = int(saved.classifier.feature_settings.get("n_extra_features", 0))
    _check_extra_features(extra_features, n_extra)
    if int(jobs) < 1:
        raise FetalAnnotateError(f"jobs is {jobs}; give 1 or more")
    context = _worker_context() if int(jobs) > 1 else None
    output_dir = _checked_output_dir(output_dir)
    volumes, skipped = find_volumes(inputs)
    for path, reason in skipped:
        log(f"skipped {path}: {reason}")
    if not volumes:
        raise FetalAnnotateError(f"no image volume to segment in {_quoted(inputs)}"
                                 + (f" ({len(skipped)} other files skipped)" if skipped else "")
                                 + "; give NIfTI/NRRD/MetaImage files, DICOM series folders or folders of them")
    outputs = _planned_outputs(volumes, output_dir)
    _check_writable(output_dir)
    volumes = shard_of(volumes, shard)
    report_stem = output_dir / (REPORT_NAME if shard is None else f"{REPORT_NAME}-shard-{shard[0]}-of-{shard[1]}")
    n_features = int(getattr(saved.classifier.forest, "n_features_in_", 0))
    estimates = {source: estimate_memory(source, n_features, len(saved.class_names)) for source in volumes}
    budget = _memory_budget(memory_budget, estimates, int(jobs), log)
    if shard is not None:
        log(f"shard {shard[0]}/{shard[1]}: {len(volumes)} volumes")

    done = {}
    todo = []
    for source in volumes:
        found = _file_state(outputs[source])
        item = None if found is None else _existing_item(source, outputs[source], saved.class_names, digest,
                                                         overwrite)
        if item is None:
            todo.append((source, found))
            for leftover in leftover_partial_files(outputs[source]):
                leftover.unlink(missing_ok=True)  # from a run killed while writing this output
        else:
            done[source] = item
            log(_item_line(item))
    settings = {"classifier": str(classifier_path), "inputs": [str(path) for path in volumes], "jobs": int(jobs),
                "shard": None if shard is None else f"{shard[0]}/{shard[1]}", "memory_budget_bytes": budget,
                "overwrite": bool(overwrite), "extra_features": extra_features, "started": started.isoformat()}

    def finished(item):
        done[item.source] = item
        log(_item_line(item))
        return _asks_to_stop(progress, len(done) / len(volumes),
                             f"{item.source.name} {item.status} ({len(done)} of {len(volumes)})")

    cancelled = False
    try:
        tasks = [(source, outputs[source], _extra_path(extra_features, source), digest, found)
                 for source, found in todo]
        if int(jobs) == 1:
            cancelled = _run_here(saved, tasks, len(done), len(volumes), progress, finished)
        else:
            cancelled = _run_in_workers(classifier_path, tasks, int(jobs), context, budget, estimates, finished)
    finally:
        items = tuple(done[source] for source in volumes if source in done)
        result = BatchResult(items, tuple(skipped), tuple(saved.class_names), report_stem.with_suffix(".csv"),
                             report_stem.with_suffix(".json"))
        _write_report(result, digest, settings)
    summary = (f"{sum(item.status != 'failed' for item in items)} of {len(volumes)} volumes segmented "
               f"({sum(item.status == 'existing' for item in items)} kept from before), "
               f"{len(result.failed)} failed; report: {result.report_csv}")
    if cancelled:
        raise BatchCancelled(f"cancelled: {summary}; run again to continue", result)
    report_progress(progress, 1.0, summary)
    return result


def _asks_to_stop(progress, fraction, message):
    """Call ``progress`` and return True when it asks to stop."""
    try:
        report_progress(progress, fraction, message)
    except OperationCancelled:
        return True
    return False


def _run_here(saved, tasks, n_done, n_total, progress, finished):
    """Segment the tasks one by one in this process; True when cancelled."""
    saved.classifier.forest.n_jobs = 1  # same sums in the same order as in worker processes
    for index, (source, output, extra_path, digest, found) in enumerate(tasks):
        def volume_progress(fraction, message, _done=n_done + index, _name=source.name):
            return progress is not None and progress((_done + fraction) / n_total, f"{_name}: {message}")

        try:
            item = _segment_volume(saved, source, output, extra_path, digest, found, volume_progress)
        except OperationCancelled:
            return True
        if finished(item):
            return True
    return False


def _run_in_workers(classifier_path, tasks, jobs, context, budget, estimates, finished):
    """Segment the tasks in ``jobs`` worker processes within the memory budget; True when cancelled.

    A worker that dies (e.g. killed for lack of memory) breaks the whole pool: every volume
    running then fails (running the batch again retries them) and a new pool takes the rest.
    """
    pending = list(tasks)
    running = {}
    cancelled = False
    pool = None
    try:
        while (pending and not cancelled) or running:
            if pool is None:
                pool = ProcessPoolExecutor(max_workers=min(jobs, len(pending) + len(running)), mp_context=context,
                                           initializer=_start_worker, initargs=(str(classifier_path),))
            in_use = sum(estimates[task[0]] for task in running.values())
            while pending and not cancelled and len(running) < jobs and \
                    (not running or in_use + estimates[pending[0][0]] <= budget):
                task = pending.pop(0)
                running[pool.submit(_segment_in_worker, *task)] = task
                in_use += estimates[task[0]]
            finished_now, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = False
            for future in finished_now:
                source = running.pop(future)[0]
                try:
                    item = future.result()
                except BrokenProcessPool:
                    broken = True
                    item = BatchItem(source, None, "failed", error="its worker process stopped (often for lack of "
                                     "memory); run again with fewer --jobs or a smaller --memory-gb to retry it")
                cancelled = finished(item) or cancelled
            if broken:
                pool.shutdown(wait=True)
                pool = None
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return cancelled


def _worker_context():
    """The multiprocessing context of the workers; refused inside Slicer's application.

    Where available, a fork server that imported the libraries once forks the workers, so
    ``--jobs N`` pays the imports once instead of N times; elsewhere (Windows) workers are
    spawned. Both start a fresh interpreter from ``sys.executable``: that must be a Python
    executable, and not the application's embedded Python (where ``slicer.app`` exists and
    ``sys.executable`` names the PythonSlicer launcher), whose GUI process must not fork.
    """
    inside_slicer_application = getattr(sys.modules.get("slicer"), "app", None) is not None
    if inside_slicer_application or "python" not in Path(sys.executable).name.lower():
        raise FetalAnnotateError("worker processes need a Python executable: inside Slicer use jobs=1, or run "
                                 "'fetalannotate apply --jobs N ...' in a terminal (pip install the repository)")
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "sklearn.ensemble", "skops.io", "SimpleITK"])
    return context


_worker_classifier = None


def _start_worker(classifier_path):
    """Load the classifier once per worker process."""
    global _worker_classifier
    _worker_classifier = load_classifier(classifier_path)
    _worker_classifier.classifier.forest.n_jobs = 1  # one core per worker; same sums as in one process


def _segment_in_worker(source, output, extra_path, digest, found):
    return _segment_volume(_worker_classifier, source, output, extra_path, digest, found)


def _segment_volume(saved, source, output, extra_path, digest, found, progress=None):
    """Segment one volume and write its ``.seg.nrrd`` (marked with the classifier's SHA-256
    ``digest``, :data:`OUTPUT_MARK`, and with :data:`LABELS_MARK`); a failure becomes a failed item.

    ``found`` is the output's :func:`_file_state` when the batch checked it: an output written or
    changed since (by another run, or by hand) is kept.
    """
    started = time.perf_counter()
    try:
        volume = read_volume(source)
        extra = None if extra_path is None else _read_extra_features(extra_path, volume)
        probabilities = saved.classifier.predict_proba(volume.array, volume.spacing, progress=progress,
                                                       extra_features=extra)
        labels = (np.argmax(probabilities, axis=0) + 1).astype(np.uint8)
        del probabilities
        if _file_state(output) != found:
            # Another run of this batch may have written it meanwhile: then it is this volume's result.
            written = _existing_item(source, output, saved.class_names, digest, overwrite=False)
            if written is not None and written.status == "existing":
                return written
            raise FetalAnnotateError(f"{output} was written or changed by another program or run while this volume "
                                     "was segmented; it is kept: run the same command again to check it")
        write_segmentation(output, labels, saved.class_names, spacing=volume.spacing, origin=volume.origin,
                           direction=volume.direction,
                           header={OUTPUT_MARK: digest, LABELS_MARK: _labels_digest(labels, saved.class_names)})
        voxels = np.bincount(labels.ravel(), minlength=len(saved.class_names) + 1)[1:]
        return BatchItem(source, output, "segmented", seconds=time.perf_counter() - started,
                         voxels=tuple(int(count) for count in voxels),
                         voxel_ml=float(np.prod(volume.spacing)) / 1000.0)
    except OperationCancelled:
        raise
    except (FetalAnnotateError, OSError, MemoryError) as error:
        return BatchItem(source, None, "failed", error=str(error) or type(error).__name__,
                         seconds=time.perf_counter() - started)
    except Exception as error:  # one volume's unforeseen failure must not stop the batch
        return BatchItem(source, None, "failed", error=f"unexpected {type(error).__name__}: {error}",
                         seconds=time.perf_counter() - started, details=traceback.format_exc())


def _existing_item(source, output, class_names, digest, overwrite):
    """The item of a volume whose output exists, or None when the volume is to be segmented again.

    Without ``overwrite`` the output is this run's result (status ``"existing"``, with its class
    volumes) when this classifier (SHA-256 ``digest``) wrote it for the volume's voxel grid and
    it was not edited since; with ``overwrite`` any unedited output of the batch is segmented
    again. Otherwise the output is kept and the volume fails with why.
    """
    import SimpleITK as sitk

    started = time.perf_counter()

    def failed(error):
        return BatchItem(source, None, "failed", error=error, seconds=time.perf_counter() - started)

    def kept(why):
        return failed(f"{output} {why}; it is kept (--overwrite replaces only unedited outputs of the batch): "
                      "move it away, or give another --output, to segment this volume")

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(output))
    try:
        reader.ReadImageInformation()
        if not reader.HasMetaDataKey(OUTPUT_MARK):  # e.g. Slicer's file of overlapping segments: not read
            return kept("was not written by the batch (saved again from Slicer, or made elsewhere)")
        check_volume_file(output)  # a truncated output would report wrong volumes
        labels, names = read_segmentation(output)
    except (FetalAnnotateError, RuntimeError, ValueError, OSError) as error:
        return kept(f"cannot be read ({error})")
    recorded = reader.GetMetaData(LABELS_MARK) if reader.HasMetaDataKey(LABELS_MARK) else None
    unedited = recorded is not None and recorded == _labels_digest(labels, names)
    if recorded is not None and not unedited:
        return kept("was changed since the batch wrote it (its segment names or voxels differ)")
    doubt = "may have been corrected since (an earlier version of FetalAnnotate wrote it without recording its voxels)"
    if overwrite:
        return None if unedited else kept(doubt)
    if reader.GetMetaData(OUTPUT_MARK) != digest:
        difference = "was written by another classifier"
    elif list(names) != list(class_names):
        difference = f"holds segments {names}, not this classifier's {list(class_names)}"
    else:
        try:
            difference = _grid_difference(reader, *read_volume_grid(source))
        except FetalAnnotateError as error:
            return failed(str(error))
    if difference is not None and unedited:
        return failed(f"{output} {difference}: give --overwrite to replace it, or another --output")
    if difference is not None:
        return kept(f"{difference}, and {doubt}")
    voxels = np.bincount(labels.ravel(), minlength=len(names) + 1)[1:]
    return BatchItem(source, output, "existing", seconds=time.perf_counter() - started,
                     voxels=tuple(int(count) for count in voxels),
                     voxel_ml=float(np.prod(reader.GetSpacing())) / 1000.0)


def _grid_difference(reader, shape, spacing, origin, direction):
    """How the voxel grid of an output (its header ``reader``) differs from its volume's
    (:func:`~FetalAnnotateLib.segio.read_volume_grid`), or None."""
    written_shape, written_spacing = tuple(reader.GetSize())[::-1], tuple(reader.GetSpacing())[::-1]
    if written_shape != tuple(shape) or not np.allclose(written_spacing, spacing, rtol=1e-4):
        return (f"was written for {written_shape} voxels of {written_spacing} mm, but the volume has {tuple(shape)} "
                f"of {tuple(spacing)} mm")
    if not np.allclose(reader.GetOrigin(), origin, rtol=1e-4, atol=1e-3) or \
            not np.allclose(reader.GetDirection(), np.ravel(direction), atol=1e-4):
        return "was written for a volume at another position or orientation"
    return None


def _labels_digest(labels, names):
    """SHA-256 of segment names and a label map (value k: ``names[k - 1]``), as :data:`LABELS_MARK` holds it."""
    digest = hashlib.sha256(json.dumps([list(names), list(labels.shape)]).encode())
    digest.update(np.ascontiguousarray(labels, "<u2").tobytes())
    return digest.hexdigest()


def _file_state(path):
    """(size, modification time) of a file, to notice that it changed; None when it does not exist."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _check_extra_features(pattern, n_extra):
    """Refuse, before any work, extra features that do not fit the classifier."""
    if n_extra and pattern is None:
        raise FetalAnnotateError(
            f"the classifier was trained with {n_extra} extra feature channels; give each volume's feature "
            "volume (exported as for training) with --extra-features, e.g. 'features/{name}_features.nrrd'")
    if not n_extra and pattern is not None:
        raise FetalAnnotateError("the classifier was trained without extra features; leave out --extra-features")
    if pattern is not None and "{name}" not in str(pattern):
        raise FetalAnnotateError(f"--extra-features {pattern!r} has no '{{name}}' for the volume's name, "
                                 "e.g. 'features/{name}_features.nrrd'")


def _extra_path(pattern, source):
    return None if pattern is None else Path(str(pattern).replace("{name}", volume_name(source)))


def _read_extra_features(path, volume):
    """A volume's feature channels (C, z, y, x), checked against its voxel grid."""
    features = read_feature_volume(path)
    if features.array.shape[1:] != volume.array.shape or \
            not np.allclose(features.spacing, volume.spacing, rtol=1e-4):
        raise FetalAnnotateError(
            f"feature volume {path} has {features.array.shape[1:]} voxels of {features.spacing} mm but the volume has "
            f"{volume.array.shape} of {volume.spacing} mm; export the features of this volume itself")
    return features.array


def _checked_output_dir(output_dir):
    """The output folder, refused when it is a file or named like one."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FetalAnnotateError(f"output {output_dir} is a file; give a folder for the .seg.nrrd files")
    if not output_dir.exists() and output_dir.name.lower().endswith(VOLUME_SUFFIXES + (".seg.nrrd",)):
        raise FetalAnnotateError(f"output {output_dir} looks like a file name; give a folder: one <name>.seg.nrrd "
                                 "is written into it per volume")
    return output_dir


def _check_writable(output_dir):
    """Create the output folder if needed; refuse it when no file can be written into it."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise FetalAnnotateError(f"cannot write into the output folder {output_dir} ({error.strerror or error}); "
                                 "give a folder you may write to with --output") from error


def _planned_outputs(volumes, output_dir):
    """``<output_dir>/<name>.seg.nrrd`` per volume; refused when two collide.

    Names that differ only in letter case or Unicode normalization collide too: they are one
    file on macOS and Windows. No output can be an input: ``.seg.nrrd`` files are never taken
    as volumes.
    """
    outputs = {source: output_dir / f"{volume_name(source)}.seg.nrrd" for source in volumes}
    by_name = {}
    for source, output in outputs.items():
        by_name.setdefault(unicodedata.normalize("NFC", output.name).casefold(), []).append(source)
    collisions = [sources for sources in by_name.values() if len(sources) > 1]
    if collisions:
        listed = "; ".join(" and ".join(str(source) for source in sources) for sources in collisions[:5])
        raise FetalAnnotateError(f"{sum(map(len, collisions))} inputs would write the same output ({listed}): "
                                 "rename them or segment them into separate --output folders")
    return outputs


def _memory_budget(memory_budget, estimates, jobs, log):
    """The memory budget in bytes (default: a share of the available memory), logged with what it allows."""
    if memory_budget is None:
        available = available_memory()
        budget = int(available * DEFAULT_MEMORY_SHARE) if available else 4 * 2**30
        origin = (f"{DEFAULT_MEMORY_SHARE:.0%} of the {available / 2**30:.1f} GiB available" if available
                  else "the available memory is unknown")
    else:
        budget = int(memory_budget)
        if budget <= 0:
            raise FetalAnnotateError(f"memory budget {memory_budget} is not positive")
        origin = "given"
    largest = max(estimates.values(), default=0)
    at_once = max(1, min(jobs, budget // max(largest, 1)))
    log(f"memory budget {budget / 2**30:.1f} GiB ({origin}; --memory-gb sets it); a volume needs up to "
        f"{largest / 2**30:.2f} GiB: {at_once} of --jobs {jobs} at once"
        + ("; the largest volumes run alone, beyond the budget" if largest > budget else ""))
    return budget


def _item_line(item):
    """One log line for a finished volume."""
    if item.status == "failed":
        return f"FAILED {item.source}: {item.error}"
    volumes = ", ".join(f"{ml:.1f}" for ml in item.volumes_ml)
    verb = "kept existing" if item.status == "existing" else f"segmented in {item.seconds:.1f} s:"
    return f"{verb} {item.output} (mL per class: {volumes})"


def _quoted(inputs):
    return ", ".join(map(str, [inputs] if isinstance(inputs, (str, Path)) else inputs)) or "(no inputs)"


def _library_versions():
    """Versions of Python, FetalAnnotate and the libraries that shape the result."""
    from importlib import metadata

    versions = {"python": sys.version.split()[0]}
    for package in ("fetalannotate", "numpy", "scipy", "scikit-learn", "scikit-image", "SimpleITK"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _write_report(result, digest, settings):
    """Write the CSV and JSON volumetry report (each complete or not at all); ``digest`` is the
    classifier file's SHA-256."""
    header = ["source", "output", "status", "seconds", "voxel_ml", "error"]
    header += [f"{name}_{unit}" for name in result.class_names for unit in ("voxels", "ml")]
    with atomic_path(result.report_csv) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(header)
            for item in result.items:
                counts = [value for pair in zip(item.voxels, item.volumes_ml) for value in pair] or \
                    [""] * (2 * len(result.class_names))  # a failed volume: empty cells
                writer.writerow([item.source, item.output or "", item.status, f"{item.seconds:.3f}",
                                 f"{item.voxel_ml:.9g}", item.error or ""] + counts)
    content = {
        "classifier_sha256": digest,
        "class_names": list(result.class_names),
        "versions": _library_versions(),
        **settings,
        "finished": datetime.now(timezone.utc).isoformat(),
        "items": [{"source": str(item.source), "output": None if item.output is None else str(item.output),
                   "status": item.status, "seconds": round(item.seconds, 3), "error": item.error,
                   "voxel_ml": item.voxel_ml,
                   "classes": {name: {"voxels": count, "ml": ml}
                               for name, count, ml in zip(result.class_names, item.voxels, item.volumes_ml)}}
                  for item in result.items],
        "skipped": [{"path": str(path), "reason": reason} for path, reason in result.skipped],
    }
    with atomic_path(result.report_json) as temporary:
        Path(temporary).write_text(json.dumps(content, indent=1), encoding="utf-8")
