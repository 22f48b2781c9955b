"""GUI-free logic of the FetalInpaint module: volume nodes in, training process, evaluation and features out.

Everything here works on a ``vtkMRMLScene`` without the Slicer GUI (the tests use the slicer-core
wheel). The numeric work is done by ``FetalInpaintLib``; this layer converts between MRML nodes and
arrays, keeps the training in a separate process and turns results into MRML nodes.

Training runs ``<python> -m FetalInpaintLib.train`` in a child process, so Slicer stays
responsive and a crash of the training cannot take the scene down. The child prints one JSON
progress record per line; its standard output goes to ``progress.jsonl`` in the output folder and
:meth:`FetalInpaintLogic.pollTraining` reads the lines appended since the last call (the widget
calls it from a ``qt.QTimer``). Per-epoch losses come from the ``history.json`` the training
rewrites after every epoch.

Stopping does not rely on signals: in Slicer the child is the ``PythonSlicer`` launcher, which
runs the real interpreter as its own child and forwards no signal. Stop writes a stop file that the
training checks every step (it then saves its resume point and exits); a training still alive
after a grace period is killed with its whole process tree. The training holds a lock file in its
output folder, so no second training (a resume included) runs beside a live one.
"""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import slicer
import slicer.util  # noqa: F401  (makes slicer.util available as an attribute)
import vtk

from FetalInpaintLib.control import (
    LOCK_FILE_NAME,
    clear_stop_request,
    describe_lock,
    kill_process,
    kill_process_tree,
    lock_owner,
    new_process_group_options,
    read_lock,
    request_stop,
)
from FetalInpaintLib.errors import CheckpointError, FetalInpaintError, InvalidVolumeError, TrainingLockedError
from FetalInpaintLib.config import EARLIER_TRAINING_FILE_NAMES, OUTPUT_FILE_NAMES

MODULE_NAME = "FetalInpaint"

# The folder that holds the FetalInpaintLib package: the child process imports it from there.
LIBRARY_PARENT = Path(__file__).resolve().parents[1]

# Files in the training output folder: the first two are written here, the rest by FetalInpaintLib.
PROGRESS_FILE_NAME = "progress.jsonl"  # standard output of the training: JSON progress records
LOG_FILE_NAME = "training.log"  # standard error: warnings, and the error of a failed run
VOLUMES_FOLDER_NAME = "volumes"
MODEL_FILE_NAME = "model.pt"
RESUME_FILE_NAME = "resume.pt"
HISTORY_FILE_NAME = "history.json"
# What a training leaves behind; a new training in the same folder replaces all of it.
RUN_FILE_NAMES = OUTPUT_FILE_NAMES + (PROGRESS_FILE_NAME, LOG_FILE_NAME)

# Reference role and attributes that tie exported feature volumes to their source volume and model.
SOURCE_VOLUME_ROLE = "FetalInpaintSourceVolume"
CHANNEL_ATTRIBUTE = "FetalInpaint.Channel"
CHECKPOINT_ATTRIBUTE = "FetalInpaint.Checkpoint"


def defaultPythonExecutable():
    """The Python interpreter that runs the background training.

    In the Slicer application ``sys.executable`` is the ``PythonSlicer`` launcher (Slicer >= 4.10):
    it starts Slicer's own Python with Slicer's library paths and site-packages, where the PyTorch
    extension installs torch. In a plain Python (tests, ``pip install``) it is that interpreter.
    Where ``sys.executable`` is the Slicer application itself (``Slicer``, ``SlicerApp-real``),
    running it would open a second Slicer, so ``PythonSlicer`` next to it or on the PATH is used.

    Returns
    -------
    str
        Path of the interpreter.

    Raises
    ------
    FetalInpaintError
        When ``sys.executable`` is the Slicer application and no ``PythonSlicer`` is found.
    """
    executable = Path(sys.executable)
    if not executable.stem.lower().startswith("slicer"):
        return str(executable)
    suffix = ".exe" if os.name == "nt" else ""
    sibling = executable.with_name("PythonSlicer" + suffix)
    if sibling.exists():
        return str(sibling)
    onPath = shutil.which("PythonSlicer")
    if onPath:
        return onPath
    raise FetalInpaintError(
        f"cannot find the PythonSlicer interpreter next to {executable} or on the PATH; "
        "pass pythonExecutable= to FetalInpaintLogic to choose the interpreter that runs the training."
    )


def readProgress(progressPath, offset=0):
    """Read the progress records appended to a JSON-lines file since a byte offset.

    Only complete lines are read: a line the training process is still writing is left for the
    next call.

    Parameters
    ----------
    progressPath : str or pathlib.Path
        The ``progress.jsonl`` file (it may not exist yet).
    offset : int, default 0
        Byte offset returned by the previous call.

    Returns
    -------
    records : list of dict
        One dict per complete line (lines that are not valid JSON are logged and skipped).
    offset : int
        Where the next call should continue.
    """
    path = Path(progressPath)
    if not path.exists():
        return [], offset
    with open(path, "rb") as handle:
        handle.seek(offset)
        chunk = handle.read()
    end = chunk.rfind(b"\n") + 1
    records = []
    for line in chunk[:end].splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:  # not JSON, or not UTF-8
            logging.warning(f"FetalInpaint: skipped an unreadable progress line in {path}: {line[:200]!r}")
    return records, offset + end


@dataclass(frozen=True)
class VolumeData:
    """The voxels and geometry of a scalar volume node.

    Attributes
    ----------
    array : numpy.ndarray
        float32 copy of the voxels, (z, y, x) = (k, j, i) order.
    spacing : tuple of float
        Voxel size in mm, (z, y, x) order.
    ijkToRAS : numpy.ndarray
        4x4 IJK to RAS matrix (origin, spacing and axis directions).
    name : str
        Node name, for messages.
    """

    array: np.ndarray
    spacing: tuple
    ijkToRAS: np.ndarray
    name: str


def readHistory(outputDirectory):
    """Per-epoch losses of a training: the ``history.json`` FetalInpaintLib rewrites after each epoch.

    Parameters
    ----------
    outputDirectory : str or pathlib.Path

    Returns
    -------
    list of dict
        ``epoch`` (0-based), ``step``, ``loss`` (mean training loss of the epoch), ``val_loss``
        (None without validation volumes), ``patches_per_s``; empty before the first epoch ends.
    """
    path = Path(outputDirectory) / HISTORY_FILE_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # not written yet (it is replaced atomically, never torn)
        return []


@dataclass
class TrainingProcess:
    """A training running (or finished) in a child process; returned by :meth:`FetalInpaintLogic.startTraining`.

    Attributes
    ----------
    process : subprocess.Popen
        The child process.
    command : list of str
        Its command line.
    outputDirectory : pathlib.Path
        Where the checkpoints, progress and log are written.
    epochs : int
        Requested number of epochs.
    startTime : float
        ``time.monotonic()`` when the process started (for the progress fraction).
    records : list of dict
        Every progress record read so far (of earlier runs too, when resumed).
    earlierRecords : int
        How many of ``records`` come from earlier runs in the same folder.
    progressOffset : int
        Bytes of ``progress.jsonl`` read so far.
    logOffset : int
        Size of ``training.log`` before this run: its own messages start there.
    startedAt : float
        ``time.time()`` when the process started (a lock taken later is this run's).
    stopRequested : bool
        :meth:`FetalInpaintLogic.requestStop` was called.
    stopRequestedAt : float or None
        ``time.monotonic()`` of the stop request.
    stopGraceSeconds : float, default 30
        How long the training may take to stop by itself before it is killed.
    killed : bool
        The process tree was killed.
    """

    process: subprocess.Popen
    command: list
    outputDirectory: Path
    epochs: int
    startTime: float
    records: list = field(default_factory=list)
    earlierRecords: int = 0
    progressOffset: int = 0
    logOffset: int = 0
    startedAt: float = 0.0
    stopRequested: bool = False
    stopRequestedAt: Optional[float] = None
    stopGraceSeconds: float = 30.0
    killed: bool = False

    @property
    def progressPath(self):
        return self.outputDirectory / PROGRESS_FILE_NAME

    @property
    def logPath(self):
        return self.outputDirectory / LOG_FILE_NAME


@dataclass(frozen=True)
class TrainingStatus:
    """A snapshot of a training, returned by :meth:`FetalInpaintLogic.pollTraining`.

    Attributes
    ----------
    running : bool
        The child process is still alive.
    returnCode : int or None
        Exit code once finished (0 = success).
    outcome : {"running", "stopping", "finished", "stopped", "killed", "failed"}
        What really happened: "stopping" while a requested stop has not taken effect yet,
        "stopped" when the training saved its state and exited on request, "killed" when it did
        not stop within the grace period and its process tree was killed, "finished" when it ran to
        its end (also when a stop came too late).
    stopped : bool
        It ended because of a stop request ("stopped" or "killed").
    epochsCompleted : int
        Epochs saved in ``history.json``.
    canResume : bool
        ``resume.pt`` exists: a training with ``resume=True`` continues after the last saved epoch.
    newRecords : list of dict
        Progress records that arrived since the previous poll.
    latest : dict or None
        The most recent record with a loss (keys written by FetalInpaintLib: ``epoch`` (0-based),
        ``step``, ``loss``, ``val_loss``, ``patches_per_s``, ``eta_s``).
    fraction : float
        Estimated completed fraction of this run, in [0, 1]: elapsed / (elapsed + ETA).
    message : str
        One line for the status label (epoch, losses, speed, ETA; or the error).
    """

    running: bool
    returnCode: Optional[int]
    outcome: str
    stopped: bool
    epochsCompleted: int
    canResume: bool
    newRecords: list
    latest: Optional[dict]
    fraction: float
    message: str


class FetalInpaintLogic:
    """Numeric work of the FetalInpaint module on MRML nodes, without any GUI.

    Parameters
    ----------
    pythonExecutable : str or None
        Interpreter for the background training; default :func:`defaultPythonExecutable`.

    Notes
    -----
    The last loaded checkpoint is kept (keyed by path, modification time and device) so that
    evaluating and exporting with the same model does not reload it; :meth:`loadModel` with a
    changed file reloads.
    """

    def __init__(self, pythonExecutable=None):
        self.pythonExecutable = pythonExecutable
        self._loadedModel = None  # (key, model, metadata)
        self._runs = []  # the trainings this object started, for stopAllTrainings

    # ------------------------------------------------------------------ parameter node

    @staticmethod
    def getParameterNode(scene=None):
        """The module's singleton ``vtkMRMLScriptedModuleNode``, created when missing.

        The widget wraps it in ``FetalInpaintParameterNode`` (the parameter node wrapper is only
        available in the Slicer application).

        Parameters
        ----------
        scene : vtkMRMLScene or None
            Default ``slicer.mrmlScene``.

        Returns
        -------
        vtkMRMLScriptedModuleNode
        """
        scene = scene if scene is not None else slicer.mrmlScene
        node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)  # the Python variable owns it now
            node.SetSingletonTag(MODULE_NAME)
            node.SetName(scene.GenerateUniqueName(MODULE_NAME))
            node = scene.AddNode(node)
        # A scene close may clear attributes; selectors filter parameter nodes by this one.
        node.SetAttribute("ModuleName", MODULE_NAME)
        return node

    # ------------------------------------------------------------------ volumes

    @staticmethod
    def volumeData(volumeNode):
        """Voxels (float32 copy, z, y, x) and geometry of a scalar volume node, checked for use.

        Parameters
        ----------
        volumeNode : vtkMRMLScalarVolumeNode

        Returns
        -------
        VolumeData

        Raises
        ------
        InvalidVolumeError
            No node, not a grayscale scalar volume, no voxels, or NaN / infinite voxels.
        """
        if volumeNode is None:
            raise InvalidVolumeError("no volume selected: choose a scalar volume (load one with File > Add Data).")
        name = volumeNode.GetName()
        if not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InvalidVolumeError(
                f"'{name}' is a {volumeNode.GetClassName()}: choose a grayscale scalar volume "
                "(not a label map, vector or tensor volume)."
            )
        imageData = volumeNode.GetImageData()
        if imageData is None or imageData.GetNumberOfPoints() == 0:
            raise InvalidVolumeError(f"'{name}' holds no voxels: load its image file again.")
        if imageData.GetNumberOfScalarComponents() != 1:
            raise InvalidVolumeError(
                f"'{name}' has {imageData.GetNumberOfScalarComponents()} components per voxel: "
                "choose a single-component (grayscale) volume."
            )
        array = slicer.util.arrayFromVolume(volumeNode).astype(np.float32)
        notFinite = int(np.count_nonzero(~np.isfinite(array)))
        if notFinite:
            raise InvalidVolumeError(
                f"'{name}' holds {notFinite} NaN or infinite voxels: replace them (for example with "
                "numpy.nan_to_num on slicer.util.arrayFromVolume) or crop them away first."
            )
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        return VolumeData(
            array=array,
            spacing=tuple(float(s) for s in reversed(volumeNode.GetSpacing())),
            ijkToRAS=slicer.util.arrayFromVTKMatrix(matrix),
            name=name,
        )

    @staticmethod
    def checkVolumeFitsPatch(data, patchSize):
        """Raise a clear error when the slices of a volume are smaller than a training patch.

        Slices are taken along the acquisition (thickest) axis, or the single slice of a single image,
        as FetalInpaintLib does in training, evaluation and feature export.

        Parameters
        ----------
        data : VolumeData
        patchSize : int

        Raises
        ------
        InvalidVolumeError
        """
        from FetalInpaintLib.data import acquisition_axis

        axis = acquisition_axis(data.spacing, data.array.shape)
        rows, columns = (size for index, size in enumerate(data.array.shape) if index != axis)
        if min(rows, columns) < patchSize:
            raise InvalidVolumeError(
                f"the slices of '{data.name}' are {rows} x {columns} voxels, smaller than the "
                f"{patchSize} x {patchSize} patch of the model: choose a larger volume (or train with a smaller patch size)."
            )

    @staticmethod
    def writeVolume(volumeNode, path):
        """Write a volume node to a NRRD file (with its geometry) without the Slicer application.

        Parameters
        ----------
        volumeNode : vtkMRMLScalarVolumeNode
        path : str or pathlib.Path

        Returns
        -------
        pathlib.Path
        """
        path = Path(path)
        storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storageNode.SetFileName(str(path))
        storageNode.SetUseCompression(True)
        if not storageNode.WriteData(volumeNode):
            raise FetalInpaintError(f"could not write '{volumeNode.GetName()}' to {path}: check that the folder is writable.")
        return path

    # ------------------------------------------------------------------ background training

    def startTraining(
        self,
        volumeNodes,
        outputDirectory,
        corruptor="shapes",
        corruptorStrength=0.2,
        epochs=20,
        device="auto",
        patchSize=None,
        resume=False,
        overwrite=False,
        threads=None,
        extraArguments=(),
    ):
        """Start the training of an inpainting autoencoder in a background process.

        The volumes are written to ``<outputDirectory>/volumes`` as NRRD, then
        ``<python> -m FetalInpaintLib.train`` runs with its working directory set to the folder that
        holds FetalInpaintLib (``-m`` puts the working directory on ``sys.path``, which works even
        where Slicer's launcher rewrites ``PYTHONPATH``). Progress records go to ``progress.jsonl``,
        everything else the process prints to ``training.log``.

        Parameters
        ----------
        volumeNodes : sequence of vtkMRMLScalarVolumeNode
            Unlabeled training volumes; with two or more, FetalInpaintLib holds whole volumes out
            for validation.
        outputDirectory : str or pathlib.Path
            Created if missing; receives volumes, ``model.pt`` + ``model.json``, ``resume.pt``,
            ``history.json``, ``loss_curve.png``, ``progress.jsonl`` and ``training.log``.
        corruptor : {"shapes", "holes", "toss"}
        corruptorStrength : float, default 0.2
            Hidden fraction of each patch.
        epochs : int, default 20
        device : {"auto", "cpu", "cuda"}
            "auto" takes the GPU when PyTorch sees one.
        patchSize : int or None
            Training patch side; None uses FetalInpaintLib's default.
        resume : bool, default False
            Continue from ``resume.pt`` in ``outputDirectory`` (same volumes and settings).
        overwrite : bool, default False
            Without ``resume``, delete the files of an earlier training in ``outputDirectory``
            (see :meth:`hasTrainingOutputs`) instead of refusing to start.
        threads : int or None
            CPU threads of the training; default one less than the cores, so Slicer stays fluid.
        extraArguments : sequence of str
            More options of ``python -m FetalInpaintLib.train`` (e.g. ``["--base-channels", "16"]``).

        Returns
        -------
        TrainingProcess

        Raises
        ------
        InvalidVolumeError
            No volume, or a volume that is empty, not finite or smaller than a patch.
        TrainingLockedError
            A training still runs in ``outputDirectory`` (see :meth:`trainingLockOwner`); nothing is
            changed in the folder.
        FetalInpaintError
            Bad parameters, no interpreter, nothing to resume, or an earlier training in the folder
            (without ``overwrite``).
        """
        volumeNodes = [node for node in (volumeNodes or []) if node is not None]
        if not volumeNodes:
            raise InvalidVolumeError("no training volume selected: tick at least one volume in 'Training volumes'.")
        if int(epochs) < 1:
            raise FetalInpaintError(f"epochs must be at least 1, got {epochs}.")
        from FetalInpaintLib.config import TrainConfig

        patchSize = int(patchSize or TrainConfig().patch_size)
        for node in volumeNodes:
            self.checkVolumeFitsPatch(self.volumeData(node), patchSize)
        threads = int(threads or max(1, (os.cpu_count() or 2) - 1))

        outputDirectory = Path(outputDirectory).resolve()
        volumeFolder = outputDirectory / VOLUMES_FOLDER_NAME
        self._refuseLockedFolder(outputDirectory)
        if resume and not (outputDirectory / RESUME_FILE_NAME).exists():
            raise FetalInpaintError(
                f"nothing to resume in {outputDirectory}: a training saves its resume point at the end of each "
                "epoch. Untick Resume to start a new training, or choose the folder of the interrupted one."
            )
        if not resume and self.hasTrainingOutputs(outputDirectory):
            if not overwrite:
                raise FetalInpaintError(
                    f"{outputDirectory} already holds a training: tick Resume to continue it, choose another "
                    "output folder, or overwrite it."
                )
            for name in RUN_FILE_NAMES:
                (outputDirectory / name).unlink(missing_ok=True)
            for path in volumeFolder.glob("*.nrrd"):
                path.unlink()
        volumeFolder.mkdir(parents=True, exist_ok=True)
        # Stable file names: FetalInpaintLib splits train/validation by file, and resume checks the split.
        volumePaths = [
            self.writeVolume(node, volumeFolder / f"{index:03d}_{_safeFileName(node.GetName())}.nrrd")
            for index, node in enumerate(volumeNodes)
        ]

        command = [
            self.pythonExecutable or defaultPythonExecutable(),
            "-m", "FetalInpaintLib.train",
            "--volumes", *[str(path) for path in volumePaths],
            "--out", str(outputDirectory),
            "--corruptor", str(corruptor),
            "--strength", str(float(corruptorStrength)),
            "--epochs", str(int(epochs)),
            "--device", str(device),
            "--patch-size", str(patchSize),
            "--threads", str(threads),
            *(["--resume"] if resume else []),
            *[str(argument) for argument in extraArguments],
        ]
        # Records of an interrupted run stay in the plot; the new process appends after them.
        earlierRecords, progressOffset = readProgress(outputDirectory / PROGRESS_FILE_NAME)
        logPath = outputDirectory / LOG_FILE_NAME
        logOffset = logPath.stat().st_size if logPath.exists() else 0
        clear_stop_request(outputDirectory)  # left over from a run that was killed: it would stop this one
        logging.info(f"FetalInpaint: starting training: {' '.join(command)}")
        startedAt = time.time()
        with open(outputDirectory / PROGRESS_FILE_NAME, "ab") as progress, open(logPath, "ab") as log:
            process = subprocess.Popen(
                command,
                cwd=str(LIBRARY_PARENT),
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
                stdin=subprocess.DEVNULL,
                stdout=progress,
                stderr=log,
                # Its own process group (on Windows also no console window), so that a kill reaches the
                # interpreter that PythonSlicer starts as well.
                **new_process_group_options(),
            )
        run = TrainingProcess(process=process, command=command, outputDirectory=outputDirectory, epochs=int(epochs),
                              startTime=time.monotonic(), records=earlierRecords, earlierRecords=len(earlierRecords),
                              progressOffset=progressOffset, logOffset=logOffset, startedAt=startedAt)
        self._runs = [other for other in self._runs if other.process.poll() is None] + [run]
        return run

    @staticmethod
    def trainingLockOwner(outputDirectory):
        """The live training that writes to a folder, or None.

        Parameters
        ----------
        outputDirectory : str or pathlib.Path

        Returns
        -------
        dict or None
            ``pid``, ``host`` and ``started`` (seconds since the epoch) of the process holding
            ``training.lock``; a lock left by a process that no longer exists counts as free.
        """
        return lock_owner(outputDirectory)

    def _refuseLockedFolder(self, outputDirectory):
        """Raise TrainingLockedError while a training of this logic or any live process writes to the folder."""
        for other in self._runs:
            if other.outputDirectory == outputDirectory and other.process.poll() is None:
                raise TrainingLockedError(
                    f"a training started from this module still runs in {outputDirectory}: stop it or wait until "
                    "it ends, or choose another output folder."
                )
        owner = lock_owner(outputDirectory)
        if owner is not None:
            raise TrainingLockedError(describe_lock(owner, outputDirectory))

    def pollTraining(self, run):
        """Read new progress of a training and summarise its state (never blocks for long).

        When a stop was requested :attr:`TrainingProcess.stopGraceSeconds` ago and the training
        still runs, its process tree is killed here.

        Parameters
        ----------
        run : TrainingProcess

        Returns
        -------
        TrainingStatus
        """
        returnCode = run.process.poll()  # before reading, so the last records of an ended run are read
        if (returnCode is None and run.stopRequestedAt is not None
                and time.monotonic() - run.stopRequestedAt > run.stopGraceSeconds):
            returnCode = self._killTraining(run)
        newRecords, run.progressOffset = readProgress(run.progressPath, run.progressOffset)
        run.records.extend(newRecords)
        ownRecords = run.records[run.earlierRecords:]
        latest = next((record for record in reversed(ownRecords) if record.get("loss") is not None), None)
        fraction = 0.0
        if latest is not None and latest.get("eta_s") is not None:
            elapsed = time.monotonic() - run.startTime
            fraction = elapsed / max(elapsed + float(latest["eta_s"]), 1e-9)
        describe = _describeRecord(latest, run.epochs) if latest else ""
        done = len(readHistory(run.outputDirectory))
        canResume = (run.outputDirectory / RESUME_FILE_NAME).exists()
        resumeHint = (f"tick Resume and Start to continue from epoch {done + 1}." if canResume
                      else "nothing was saved to resume: start a new training.")
        # The training prints a summary with "interrupted" as its last record when it ends by itself.
        summary = next((record for record in reversed(ownRecords) if "interrupted" in record), None)
        if returnCode is None:
            outcome = "stopping" if run.stopRequested else "running"
            message = ("Stopping: the training saves its resume point and exits..." if run.stopRequested
                       else describe or "Starting (loading volumes and PyTorch)...")
        elif run.killed:
            outcome = "killed"
            message = (f"The training did not stop within {run.stopGraceSeconds:g} s and was ended by force after "
                       f"{done} completed epoch(s); {resumeHint}")
        elif returnCode == 0 and summary is not None and summary["interrupted"]:
            outcome = "stopped"
            message = f"Stopped during epoch {done + 1}/{run.epochs} after {done} completed epoch(s); {resumeHint}"
        elif returnCode == 0:
            outcome = "finished"
            fraction = 1.0
            message = ("Finished before the stop took effect. " if run.stopRequested else "Finished. ") + describe
        else:
            outcome = "failed"
            message = f"Training failed (exit code {returnCode}): {_logTail(run.logPath, run.logOffset)}"
        if returnCode is not None:
            clear_stop_request(run.outputDirectory)  # served, or left by a run that was killed
        return TrainingStatus(
            running=returnCode is None,
            returnCode=returnCode,
            outcome=outcome,
            stopped=outcome in ("stopped", "killed"),
            epochsCompleted=done,
            canResume=canResume,
            newRecords=newRecords,
            latest=latest,
            fraction=min(max(fraction, 0.0), 1.0),
            message=message.strip(),
        )

    @staticmethod
    def requestStop(run):
        """Ask a training to stop; returns at once (keep polling until it has exited).

        A stop file is written to the output folder; the training checks it every optimiser step,
        saves ``resume.pt`` at that step and exits, and a resume redoes the interrupted epoch from
        its start. No signal is sent: Slicer's ``PythonSlicer`` launcher would not forward it to
        the interpreter that trains. If the training still runs ``run.stopGraceSeconds`` later,
        :meth:`pollTraining` kills its process tree.

        Parameters
        ----------
        run : TrainingProcess
        """
        if run.process.poll() is None and not run.stopRequested:
            request_stop(run.outputDirectory)
            run.stopRequested = True
            run.stopRequestedAt = time.monotonic()

    @staticmethod
    def _killTraining(run):
        """Kill the process tree of a training (and the trainer named in its lock); returns the exit code."""
        logging.warning(f"FetalInpaint: the training in {run.outputDirectory} is killed with its process tree.")
        run.killed = True
        returnCode = kill_process_tree(run.process)
        # Where the launcher's child escaped the tree (Windows), the lock it took after our start names it;
        # a lock taken on another computer (shared folder) names a process there, not here.
        owner = read_lock(run.outputDirectory)
        if (owner is not None and owner.get("host") == socket.gethostname()
                and float(owner.get("started", 0)) >= run.startedAt and owner["pid"] != run.process.pid):
            kill_process(owner["pid"])
        if lock_owner(run.outputDirectory) is None:
            (run.outputDirectory / LOCK_FILE_NAME).unlink(missing_ok=True)  # stale: its owner is dead
        return returnCode

    def stopTraining(self, run, timeout=30.0):
        """Stop a training and wait until it has exited (see :meth:`requestStop`).

        Parameters
        ----------
        run : TrainingProcess
        timeout : float, default 30
            Seconds the training may take to stop by itself before its process tree is killed.

        Returns
        -------
        TrainingStatus
            What happened ("stopped", "killed", or "finished" / "failed" when it had already ended).
        """
        return self._stopRuns([run], timeout)[0]

    def stopAllTrainings(self, timeout=10.0):
        """Stop every training this logic started that still runs, and wait (module reload, application exit).

        Parameters
        ----------
        timeout : float, default 10
            Seconds, in total, the trainings may take to stop by themselves before they are killed.

        Returns
        -------
        list of TrainingStatus
            One per training that was still running.
        """
        running = [run for run in self._runs if run.process.poll() is None]
        return self._stopRuns(running, timeout)

    def _stopRuns(self, runs, timeout):
        for run in runs:
            self.requestStop(run)
            run.stopGraceSeconds = min(run.stopGraceSeconds, float(timeout))
        deadline = time.monotonic() + float(timeout)
        while any(run.process.poll() is None for run in runs) and time.monotonic() < deadline:
            time.sleep(0.1)
        for run in runs:
            if run.process.poll() is None:
                self._killTraining(run)
        return [self.pollTraining(run) for run in runs]

    @staticmethod
    def waitForTraining(run, timeout=None, pollInterval=0.2):
        """Block until a training process ends (for scripts and tests; the GUI polls instead).

        Parameters
        ----------
        run : TrainingProcess
        timeout : float or None
            Seconds; None waits forever.
        pollInterval : float, default 0.2

        Returns
        -------
        int
            The process exit code.

        Raises
        ------
        TimeoutError
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while run.process.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"training still running after {timeout} s (log: {run.logPath}).")
            time.sleep(pollInterval)
        return run.process.returncode

    @staticmethod
    def hasTrainingOutputs(outputDirectory):
        """Whether a folder holds the model, resume point or history of an earlier training.

        Parameters
        ----------
        outputDirectory : str or pathlib.Path

        Returns
        -------
        bool
        """
        return any((Path(outputDirectory) / name).exists() for name in EARLIER_TRAINING_FILE_NAMES)

    @staticmethod
    def findCheckpoint(outputDirectory):
        """The model a training left in its output folder (best validation loss so far), or None.

        Parameters
        ----------
        outputDirectory : str or pathlib.Path

        Returns
        -------
        pathlib.Path or None
        """
        path = Path(outputDirectory) / MODEL_FILE_NAME
        return path if path.exists() else None

    @staticmethod
    def updateLossPlot(run, chartNode=None, scene=None):
        """Show the training and validation loss of a training in a plot chart node.

        The training curve has a point per progress record (the current batch's loss every
        ``log_every`` steps, the epoch's mean loss at its end); the validation curve one per
        completed epoch (from ``history.json``). Both are plotted against the optimiser step.
        Steps redone after a resume replace the interrupted run's values.

        Parameters
        ----------
        run : TrainingProcess
        chartNode : vtkMRMLPlotChartNode or None
            Chart to update; a new one (with its tables and series) is added when None or when the
            user removed it from the scene. A removed series or table is added again.
        scene : vtkMRMLScene or None
            Default ``slicer.mrmlScene`` (used only to create a new chart).

        Returns
        -------
        vtkMRMLPlotChartNode
            Show it with ``slicer.modules.plots.logic().ShowChartInLayout(chartNode)``.
        """
        if chartNode is not None and chartNode.GetScene() is None:
            chartNode = None
        scene = chartNode.GetScene() if chartNode is not None else (scene if scene is not None else slicer.mrmlScene)
        if chartNode is None:
            chartNode = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName("FetalInpaint loss"))
            chartNode.SetTitle("Inpainting loss")
            chartNode.SetXAxisTitle("optimiser step")
            chartNode.SetYAxisTitle("L2 loss on hidden pixels")
            chartNode.SetYAxisLogScale(True)
        lossByStep = {r["step"]: r["loss"] for r in run.records if r.get("loss") is not None and r.get("step") is not None}
        curves = {
            "loss": sorted(lossByStep.items()),
            "val_loss": [(h["step"], h["val_loss"]) for h in readHistory(run.outputDirectory)
                         if h.get("val_loss") is not None and np.isfinite(h["val_loss"])],
        }
        style = {
            "loss": ((0.1, 0.4, 0.8), slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone),
            "val_loss": ((0.9, 0.4, 0.1), slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle),
        }
        for key, points in curves.items():
            seriesName = f"{chartNode.GetName()} {key}"
            allSeries = [chartNode.GetNthPlotSeriesNode(i) for i in range(chartNode.GetNumberOfPlotSeriesNodes())]
            series = next((node for node in allSeries if node is not None and node.GetName() == seriesName), None)
            if series is None:
                series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", seriesName)
                series.SetXColumnName("step")
                series.SetYColumnName(key)
                series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
                series.SetColor(*style[key][0])
                series.SetMarkerStyle(style[key][1])
                chartNode.AddAndObservePlotSeriesNodeID(series.GetID())
            if series.GetTableNode() is None:
                table = scene.AddNewNodeByClass("vtkMRMLTableNode", seriesName + " table")
                series.SetAndObserveTableNodeID(table.GetID())
            values = np.asarray(points, dtype=np.float64).reshape(-1, 2)
            slicer.util.updateTableFromArray(series.GetTableNode(), [values[:, 0], values[:, 1]], ["step", key])
        return chartNode

    # ------------------------------------------------------------------ model

    @staticmethod
    def deviceDescription(device, torch):
        """What a torch device name means on this computer, for the device label.

        Parameters
        ----------
        device : {"cpu", "cuda"}
        torch : module
            The imported ``torch`` (passed in so that this module never imports it itself).

        Returns
        -------
        str
        """
        if device == "cuda":
            if not torch.cuda.is_available():
                return "no CUDA GPU found: choose cpu"
            return f"GPU: {torch.cuda.get_device_name(0)}"
        return f"CPU, {torch.get_num_threads()} threads"

    def loadModel(self, checkpointPath, device="cpu"):
        """Load a trained model and its metadata (cached while the file does not change).

        Parameters
        ----------
        checkpointPath : str or pathlib.Path
            ``model.pt`` with its ``model.json`` next to it, or the training output folder.
        device : str, default "cpu"

        Returns
        -------
        model : torch.nn.Module
            In eval mode.
        metadata : dict

        Raises
        ------
        CheckpointError
            Missing, unreadable or corrupt file (``ArchitectureMismatchError`` for weights of another
            architecture).
        """
        if checkpointPath is None or str(checkpointPath) in ("", "."):
            raise CheckpointError("no checkpoint selected: train a model first or choose its model.pt file.")
        path = Path(checkpointPath)
        if path.is_dir():
            path = path / MODEL_FILE_NAME
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} not found: choose the model.pt written by the training.")
        key = (str(path.resolve()), path.stat().st_mtime_ns, str(device))
        if self._loadedModel is None or self._loadedModel[0] != key:
            from FetalInpaintLib.training import load_checkpoint

            model, metadata = load_checkpoint(path, device=device)
            self._loadedModel = (key, model, metadata)
        return self._loadedModel[1], self._loadedModel[2]

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, checkpointPath, volumeNodes, corruptors=("shapes", "holes"), strength=None, seeds=(0, 1, 2),
                 maxPatches=100, device="cpu", tableNode=None):
        """Inpainting quality of a model next to mean fill and biharmonic fill, as a table node.

        Intensities are compared after the model's own per-volume normalisation (data range 1.0);
        the patches are non-overlapping, mostly tissue, and corrupted anew for each seed.

        Parameters
        ----------
        checkpointPath : str or pathlib.Path
        volumeNodes : vtkMRMLScalarVolumeNode or sequence of them
            Held-out volumes: evaluating on training volumes flatters the model.
        corruptors : sequence of {"shapes", "holes", "toss"}
        strength : float or None
            Hidden fraction; None uses the one the model was trained with.
        seeds : sequence of int
            One evaluation per seed; the table gives mean and standard deviation.
        maxPatches : int, default 100
            Patches evaluated (biharmonic inpainting costs about 10 ms per patch and seed).
        device : str, default "cpu"
        tableNode : vtkMRMLTableNode or None
            Table to fill (its columns are replaced); a new one is added when None or when the user
            removed it from the scene.

        Returns
        -------
        vtkMRMLTableNode
            One row per corruptor and method ("model", "mean", "biharmonic"): PSNR (dB) and SSIM
            on the hidden pixels and on the whole patch, each with its standard deviation over seeds.

        Raises
        ------
        InvalidVolumeError
            No volume, a bad volume, or no patch with enough tissue.
        CheckpointError
        """
        if volumeNodes is None or isinstance(volumeNodes, slicer.vtkMRMLNode):
            volumeNodes = [volumeNodes]
        volumes = [self.volumeData(node) for node in volumeNodes]
        model, metadata = self.loadModel(checkpointPath, device=device)
        from FetalInpaintLib.evaluation import evaluate_inpainting, held_out_patches

        patchSize = int(metadata["patch_size"])
        for data in volumes:
            self.checkVolumeFitsPatch(data, patchSize)
        percentiles = tuple(metadata["normalization"]["percentiles"])
        patches = held_out_patches([(data.array, data.spacing) for data in volumes], patchSize, percentiles,
                                   max_patches=int(maxPatches))
        if len(patches) == 0:
            raise InvalidVolumeError(
                f"{', '.join(data.name for data in volumes)} give no {patchSize} x {patchSize} patch that is "
                "mostly tissue: evaluate on a volume with more anatomy in its slices."
            )
        if strength is None:
            strength = float(metadata["corruptor"]["strength"])
        rows = evaluate_inpainting(model, patches, tuple(corruptors), float(strength), tuple(seeds), device=device)

        scene = volumeNodes[0].GetScene()
        if tableNode is None or tableNode.GetScene() is not scene:
            tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName("FetalInpaint evaluation"))
        columns = {"corruptor": [row["corruptor"] for row in rows], "method": [row["method"] for row in rows]}
        for key, title in (("psnr_hidden", "PSNR hidden (dB)"), ("psnr_whole", "PSNR whole (dB)"),
                           ("ssim_hidden", "SSIM hidden"), ("ssim_whole", "SSIM whole")):
            columns[title] = [row[key][0] for row in rows]
            columns[title + " sd"] = [row[key][1] for row in rows]
        columns["patches"] = [row["n_patches"] for row in rows]
        _fillTable(tableNode, columns)
        tableNode.SetAttribute("FetalInpaint.Strength", str(strength))
        tableNode.SetAttribute("FetalInpaint.Seeds", " ".join(str(seed) for seed in seeds))
        tableNode.SetAttribute(CHECKPOINT_ATTRIBUTE, str(checkpointPath))
        return tableNode

    # ------------------------------------------------------------------ features

    def computeFeatures(self, volumeNode, checkpointPath, pcaComponents=None, device="cpu", progress=None):
        """Per-voxel encoder features of a volume node: the extra channels for FetalAnnotate.

        Parameters
        ----------
        volumeNode : vtkMRMLScalarVolumeNode
        checkpointPath : str or pathlib.Path
        pcaComponents : int or None
            Reduce to this many principal components; None or 0 keeps every channel.
        device : str, default "cpu"
        progress : callable or None
            ``progress(fraction, message)``, called while slices are encoded.

        Returns
        -------
        numpy.ndarray
            float32 (C, z, y, x) on the voxel grid of ``volumeNode``.
        """
        data = self.volumeData(volumeNode)
        model, metadata = self.loadModel(checkpointPath, device=device)
        self.checkVolumeFitsPatch(data, int(metadata["patch_size"]))  # sliced and refused as in training
        from FetalInpaintLib.features import encode_volume

        features = encode_volume(model, data.array, data.spacing, metadata,
                                 pca_components=pcaComponents or None, progress=progress, device=device)
        return np.asarray(features, dtype=np.float32)

    def exportFeatures(self, volumeNode, checkpointPath, pcaComponents=None, asVectorVolume=False, device="cpu",
                       progress=None):
        """Compute the encoder features of a volume and add them to its scene as volume nodes.

        Parameters
        ----------
        volumeNode : vtkMRMLScalarVolumeNode
        checkpointPath : str or pathlib.Path
        pcaComponents : int or None
            None or 0 keeps every channel.
        asVectorVolume : bool, default False
            One ``vtkMRMLVectorVolumeNode`` instead of one scalar volume per channel.
        device : str, default "cpu"
        progress : callable or None
            ``progress(fraction, message)``.

        Returns
        -------
        list of vtkMRMLVolumeNode
        """
        features = self.computeFeatures(volumeNode, checkpointPath, pcaComponents, device, progress)
        return self.featuresToVolumeNodes(features, volumeNode, asVectorVolume=asVectorVolume,
                                          checkpointPath=checkpointPath)

    @staticmethod
    def featuresToVolumeNodes(features, referenceVolumeNode, asVectorVolume=False, baseName=None, checkpointPath=None):
        """Add a (C, z, y, x) feature array to the scene in the geometry of a reference volume.

        The new nodes copy the reference's origin, spacing and axis directions and are placed
        under the same parent transform, so they overlay the reference exactly.

        Parameters
        ----------
        features : array_like
            (C, z, y, x) with the reference's voxel grid.
        referenceVolumeNode : vtkMRMLVolumeNode
        asVectorVolume : bool, default False
            One multi-component ``vtkMRMLVectorVolumeNode`` instead of C scalar volumes.
        baseName : str or None
            Node name prefix; default ``<reference name>_inpaint``.
        checkpointPath : str or None
            Recorded in the node attributes for provenance.

        Returns
        -------
        list of vtkMRMLVolumeNode
        """
        if referenceVolumeNode is None or referenceVolumeNode.GetImageData() is None:
            raise InvalidVolumeError("no reference volume with voxels given: the feature volumes need its grid and geometry.")
        features = np.asarray(features, dtype=np.float32)
        gridShape = tuple(reversed(referenceVolumeNode.GetImageData().GetDimensions()))
        if features.ndim != 4 or features.shape[1:] != gridShape:
            raise FetalInpaintError(
                f"features must be (C, z, y, x) = (C, {', '.join(map(str, gridShape))}) to match "
                f"'{referenceVolumeNode.GetName()}', got {features.shape}."
            )
        scene = referenceVolumeNode.GetScene()
        baseName = baseName or f"{referenceVolumeNode.GetName()}_inpaint"
        if asVectorVolume:
            arrays = [("vtkMRMLVectorVolumeNode", baseName, None, np.ascontiguousarray(np.moveaxis(features, 0, -1)))]
        else:
            arrays = [("vtkMRMLScalarVolumeNode", f"{baseName}_{channel:02d}", channel, features[channel])
                      for channel in range(features.shape[0])]
        nodes = []
        for className, name, channel, array in arrays:
            node = scene.AddNewNodeByClass(className, scene.GenerateUniqueName(name))
            node.CopyOrientation(referenceVolumeNode)
            node.SetAndObserveTransformNodeID(referenceVolumeNode.GetTransformNodeID())
            slicer.util.updateVolumeFromArray(node, array)
            node.CreateDefaultDisplayNodes()
            node.SetNodeReferenceID(SOURCE_VOLUME_ROLE, referenceVolumeNode.GetID())
            node.SetAttribute(CHANNEL_ATTRIBUTE, "all" if channel is None else str(channel))
            if checkpointPath is not None:
                node.SetAttribute(CHECKPOINT_ATTRIBUTE, str(checkpointPath))
            nodes.append(node)
        return nodes

    @staticmethod
    def featureArrayFromNodes(featureNodes):
        """Stack exported feature volume nodes back into one (C, z, y, x) float32 array.

        Parameters
        ----------
        featureNodes : sequence of vtkMRMLVolumeNode
            Scalar volumes (one channel each, in order) and/or vector volumes (their components).

        Returns
        -------
        numpy.ndarray
        """
        channels = []
        for node in featureNodes:
            array = slicer.util.arrayFromVolume(node)
            channels.extend(np.moveaxis(array, -1, 0) if array.ndim == 4 else [array])
        if not channels:
            raise FetalInpaintError("no feature volume given: export features first.")
        shapes = {channel.shape for channel in channels}
        if len(shapes) != 1:
            raise FetalInpaintError(f"feature volumes have different grids {sorted(shapes)}: export them from one volume.")
        return np.stack(channels).astype(np.float32)


def _fillTable(tableNode, columns):
    """Replace the columns of a table node: text columns for str values, double columns otherwise."""
    table = tableNode.GetTable()
    wasModified = tableNode.StartModify()
    tableNode.RemoveAllColumns()
    for name, values in columns.items():
        array = vtk.vtkStringArray() if values and isinstance(values[0], str) else vtk.vtkDoubleArray()
        array.SetName(name)
        for value in values:
            array.InsertNextValue(value)
        table.AddColumn(array)
    tableNode.EndModify(wasModified)


def _safeFileName(name):
    """A node name reduced to characters that are safe in file names on every platform."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    return cleaned or "volume"


def _describeRecord(record, epochs):
    """One status line from a progress record (its ``epoch`` is the 0-based epoch in progress)."""
    parts = []
    if record.get("epoch") is not None:
        parts.append(f"epoch {int(record['epoch']) + 1}/{epochs}")
    if record.get("loss") is not None:
        parts.append(f"loss {record['loss']:.4g}")
    if record.get("val_loss") is not None and np.isfinite(record["val_loss"]):
        parts.append(f"validation {record['val_loss']:.4g}")
    if record.get("patches_per_s"):
        parts.append(f"{record['patches_per_s']:.0f} patches/s")
    if record.get("eta_s") is not None:
        parts.append(f"ETA {_formatDuration(record['eta_s'])}")
    return ", ".join(parts)


def _formatDuration(seconds):
    seconds = int(round(max(float(seconds), 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def _logTail(logPath, offset=0, lines=5):
    """The last lines a run wrote to the training log (from ``offset`` on), where its error is."""
    try:
        with open(logPath, "rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])
