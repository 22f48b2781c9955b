"""GUI-free logic of the FetalInpaint module: volume nodes in, training process, evaluation and features out.

Everything here works on a ``vtkMRMLScene`` without the Slicer GUI (the tests use the slicer-core
wheel). The numeric work is done by ``FetalInpaintLib``; this layer converts between MRML nodes and
arrays, keeps the training in a separate process and turns results into MRML nodes.

Training runs ``<python> -m FetalInpaintLib.train`` in a child process, so Slicer stays
responsive and a crash of the training cannot take the scene down. The child appends one JSON
object per line to ``progress.jsonl`` in the output folder; :meth:`FetalInpaintLogic.pollTraining`
reads the lines appended since the last call (the widget calls it from a ``qt.QTimer``).
"""

import json
import logging
import os
import shutil
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

from FetalInpaintLib.errors import CheckpointError, FetalInpaintError, InvalidVolumeError

MODULE_NAME = "FetalInpaint"

# The folder that holds the FetalInpaintLib package: the child process imports it from there.
LIBRARY_PARENT = Path(__file__).resolve().parents[1]

PROGRESS_FILE_NAME = "progress.jsonl"
LOG_FILE_NAME = "training.log"
STOP_FILE_NAME = "STOP"
VOLUMES_FOLDER_NAME = "volumes"

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
        except json.JSONDecodeError:
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
        Requested number of epochs (for the progress fraction).
    records : list of dict
        Every progress record read so far.
    progressOffset : int
        Bytes of ``progress.jsonl`` read so far.
    """

    process: subprocess.Popen
    command: list
    outputDirectory: Path
    epochs: int
    records: list = field(default_factory=list)
    progressOffset: int = 0

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
        Exit code once finished (0 = success, also after a requested stop).
    newRecords : list of dict
        Progress records that arrived since the previous poll.
    latest : dict or None
        The most recent record (keys as written by FetalInpaintLib: epoch, step, loss, val_loss,
        patches_per_s, eta_s, ...).
    fraction : float
        Completed fraction of the requested epochs, in [0, 1].
    message : str
        One line for the status label (epoch, losses, speed, ETA; or the error).
    """

    running: bool
    returnCode: Optional[int]
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

        Slices are taken along the acquisition (thickest) axis, as FetalInpaintLib does.

        Parameters
        ----------
        data : VolumeData
        patchSize : int

        Raises
        ------
        InvalidVolumeError
        """
        from FetalInpaintLib.data import acquisition_axis

        axis = acquisition_axis(data.spacing)
        rows, columns = (size for index, size in enumerate(data.array.shape) if index != axis)
        if min(rows, columns) < patchSize:
            raise InvalidVolumeError(
                f"the slices of '{data.name}' are {rows} x {columns} voxels, smaller than the "
                f"{patchSize} x {patchSize} training patch: choose a larger volume or a smaller patch size."
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
        corruptorStrength=0.25,
        epochs=20,
        device="cpu",
        patchSize=64,
        resume=False,
        extraArguments=(),
    ):
        """Start the training of an inpainting autoencoder in a background process.

        The volumes are written to ``<outputDirectory>/volumes`` as NRRD, then
        ``<python> -m FetalInpaintLib.train`` runs with its working directory set to the folder that
        holds FetalInpaintLib (``-m`` puts the working directory on ``sys.path``, which holds also
        where Slicer's launcher rewrites ``PYTHONPATH``). Its output goes to ``training.log``.

        Parameters
        ----------
        volumeNodes : sequence of vtkMRMLScalarVolumeNode
            Unlabeled training volumes; FetalInpaintLib holds some out for validation.
        outputDirectory : str or pathlib.Path
            Created if missing; receives volumes, checkpoints, ``progress.jsonl``, ``training.log``.
        corruptor : {"shapes", "holes", "toss"}
        corruptorStrength : float
            Hidden fraction of each patch.
        epochs : int
        device : {"cpu", "cuda"}
        patchSize : int
        resume : bool
            Continue from the last checkpoint in ``outputDirectory``.
        extraArguments : sequence of str
            More command-line options of ``FetalInpaintLib.train``.

        Returns
        -------
        TrainingProcess

        Raises
        ------
        InvalidVolumeError
            No volume, or a volume that is empty, not finite or smaller than a patch.
        FetalInpaintError
            Bad parameters or no interpreter.
        """
        volumeNodes = [node for node in (volumeNodes or []) if node is not None]
        if not volumeNodes:
            raise InvalidVolumeError("no training volume selected: tick at least one volume in 'Training volumes'.")
        if int(epochs) < 1:
            raise FetalInpaintError(f"epochs must be at least 1, got {epochs}.")
        for node in volumeNodes:
            self.checkVolumeFitsPatch(self.volumeData(node), int(patchSize))

        outputDirectory = Path(outputDirectory).resolve()
        volumeFolder = outputDirectory / VOLUMES_FOLDER_NAME
        volumeFolder.mkdir(parents=True, exist_ok=True)
        (outputDirectory / STOP_FILE_NAME).unlink(missing_ok=True)
        if not resume:
            (outputDirectory / PROGRESS_FILE_NAME).unlink(missing_ok=True)
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
            "--patch-size", str(int(patchSize)),
            "--progress-file", str(outputDirectory / PROGRESS_FILE_NAME),
            "--stop-file", str(outputDirectory / STOP_FILE_NAME),
            *(["--resume"] if resume else []),
            *[str(argument) for argument in extraArguments],
        ]
        environment = dict(os.environ, PYTHONUNBUFFERED="1")
        logging.info(f"FetalInpaint: starting training: {' '.join(command)}")
        with open(outputDirectory / LOG_FILE_NAME, "ab") as log:
            process = subprocess.Popen(
                command,
                cwd=str(LIBRARY_PARENT),
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        run = TrainingProcess(process=process, command=command, outputDirectory=outputDirectory, epochs=int(epochs))
        if resume:
            # Keep the earlier curve in the plot but start reading where the new run appends.
            run.records, run.progressOffset = readProgress(run.progressPath)
        return run

    def pollTraining(self, run):
        """Read new progress of a training and summarise its state (never blocks).

        Parameters
        ----------
        run : TrainingProcess

        Returns
        -------
        TrainingStatus
        """
        newRecords, run.progressOffset = readProgress(run.progressPath, run.progressOffset)
        run.records.extend(newRecords)
        returnCode = run.process.poll()
        latest = run.records[-1] if run.records else None
        fraction = 0.0
        if latest is not None and latest.get("epoch") is not None:
            fraction = min(1.0, float(latest["epoch"]) / max(run.epochs, 1))
        if returnCode is None:
            message = _describeRecord(latest) if latest else "Starting (loading volumes and PyTorch)..."
        elif returnCode == 0:
            fraction = 1.0
            message = "Finished. " + (_describeRecord(latest) if latest else "")
        else:
            message = f"Training failed (exit code {returnCode}). {_logTail(run.logPath)}"
        return TrainingStatus(
            running=returnCode is None,
            returnCode=returnCode,
            newRecords=newRecords,
            latest=latest,
            fraction=fraction,
            message=message.strip(),
        )

    @staticmethod
    def requestStop(run):
        """Ask a training to save a checkpoint and exit at its next step; returns immediately.

        A stop file is created in the output folder, which the training checks between steps
        (a file works the same on every platform, unlike signals). Poll until it has exited.

        Parameters
        ----------
        run : TrainingProcess
        """
        if run.process.poll() is None:
            (run.outputDirectory / STOP_FILE_NAME).touch()

    @classmethod
    def stopTraining(cls, run, timeout=60.0):
        """Ask a training to stop after saving a checkpoint, and wait for it.

        See :meth:`requestStop`. If the training has not exited within ``timeout`` seconds it is
        terminated (the last saved checkpoint is then what a resume starts from).

        Parameters
        ----------
        run : TrainingProcess
        timeout : float, default 60
            Seconds to wait for a clean exit.

        Returns
        -------
        int
            The process exit code.
        """
        if run.process.poll() is None:
            cls.requestStop(run)
            try:
                run.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logging.warning("FetalInpaint: the training did not stop in time and is terminated.")
                run.process.terminate()
                try:
                    run.process.wait(timeout=10.0)
                except subprocess.TimeoutExpired:
                    run.process.kill()
                    run.process.wait()
        return run.process.returncode

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
    def findCheckpoint(outputDirectory):
        """The checkpoint a finished training leaves in its output folder (best, else last).

        Parameters
        ----------
        outputDirectory : str or pathlib.Path

        Returns
        -------
        pathlib.Path or None
        """
        outputDirectory = Path(outputDirectory)
        for name in ("best.pt", "last.pt"):
            if (outputDirectory / name).exists():
                return outputDirectory / name
        return None

    @staticmethod
    def updateLossPlot(records, chartNode=None, scene=None):
        """Show training and validation loss of progress records in a plot chart node.

        Parameters
        ----------
        records : list of dict
            Progress records (``epoch``, ``loss`` and, at the end of each epoch, ``val_loss``).
        chartNode : vtkMRMLPlotChartNode or None
            Chart to update; a new one (with its tables and series) is added when None.
        scene : vtkMRMLScene or None
            Default ``slicer.mrmlScene`` (used only to create a new chart).

        Returns
        -------
        vtkMRMLPlotChartNode
            Show it with ``slicer.modules.plots.logic().ShowChartInLayout(chartNode)``.
        """
        scene = chartNode.GetScene() if chartNode is not None else (scene if scene is not None else slicer.mrmlScene)
        if chartNode is None:
            chartNode = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName("FetalInpaint loss"))
            chartNode.SetTitle("Inpainting loss")
            chartNode.SetXAxisTitle("epoch")
            chartNode.SetYAxisTitle("L2 loss on hidden pixels")
            chartNode.SetYAxisLogScale(True)
        curves = {
            "loss": [(r["epoch"], r["loss"]) for r in records if r.get("loss") is not None and r.get("epoch") is not None],
            "val_loss": [(r["epoch"], r["val_loss"]) for r in records if r.get("val_loss") is not None and r.get("epoch") is not None],
        }
        colors = {"loss": (0.1, 0.4, 0.8), "val_loss": (0.9, 0.4, 0.1)}
        for key, points in curves.items():
            seriesName = f"{chartNode.GetName()} {key}"
            series = next(
                (chartNode.GetNthPlotSeriesNode(i) for i in range(chartNode.GetNumberOfPlotSeriesNodes())
                 if chartNode.GetNthPlotSeriesNode(i).GetName() == seriesName),
                None,
            )
            if series is None:
                table = scene.AddNewNodeByClass("vtkMRMLTableNode", seriesName + " table")
                series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", seriesName)
                series.SetAndObserveTableNodeID(table.GetID())
                series.SetXColumnName("epoch")
                series.SetYColumnName(key)
                series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
                series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone if key == "loss"
                                      else slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
                series.SetColor(*colors[key])
                chartNode.AddAndObservePlotSeriesNodeID(series.GetID())
            values = np.asarray(points, dtype=np.float64).reshape(-1, 2)
            slicer.util.updateTableFromArray(series.GetTableNode(), [values[:, 0], values[:, 1]], ["epoch", key])
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
            ``.pt`` state dict with its JSON metadata next to it, as written by the training.
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
            raise CheckpointError("no checkpoint selected: train a model first or choose a .pt checkpoint file.")
        path = Path(checkpointPath)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist: choose the .pt file written by the training.")
        key = (str(path.resolve()), path.stat().st_mtime_ns, str(device))
        if self._loadedModel is not None and self._loadedModel[0] == key:
            return self._loadedModel[1], self._loadedModel[2]
        from FetalInpaintLib.training import load_checkpoint

        try:
            model, metadata = load_checkpoint(path, device=device)
        except FetalInpaintError:
            raise
        except Exception as error:  # torch raises many types for truncated or foreign files
            raise CheckpointError(
                f"cannot read checkpoint {path} ({type(error).__name__}: {error}); it is corrupt or not a "
                "FetalInpaint checkpoint: choose another file or train again."
            ) from error
        model.eval()
        self._loadedModel = (key, model, metadata)
        return model, metadata

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, checkpointPath, volumeNodes, corruptors=("shapes", "holes"), seeds=(0, 1, 2),
                 device="cpu", tableNode=None):
        """Inpainting quality of a model against mean fill and biharmonic fill, as a table node.

        Parameters
        ----------
        checkpointPath : str or pathlib.Path
        volumeNodes : vtkMRMLScalarVolumeNode or sequence of them
            Held-out volumes (not used for training).
        corruptors : sequence of str
            Corruptors to evaluate (hidden regions of the same strength as in training).
        seeds : sequence of int
            One evaluation per seed; the table gives mean and standard deviation.
        device : str, default "cpu"
        tableNode : vtkMRMLTableNode or None
            Table to fill; a new one is added to the scene of the first volume when None.

        Returns
        -------
        vtkMRMLTableNode
            One row per corruptor and method with hidden-region and whole-image PSNR / SSIM.
        """
        raise NotImplementedError

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
            Passed to ``FetalInpaintLib.features.encode_volume``.

        Returns
        -------
        numpy.ndarray
            float32 (C, z, y, x) on the voxel grid of ``volumeNode``.
        """
        data = self.volumeData(volumeNode)
        model, metadata = self.loadModel(checkpointPath, device=device)
        from FetalInpaintLib.features import encode_volume

        features = encode_volume(model, data.array, data.spacing, metadata,
                                 pca_components=pcaComponents or None, progress=progress)
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
        if referenceVolumeNode is None:
            raise InvalidVolumeError("no reference volume given: the feature volumes need its geometry.")
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


def _safeFileName(name):
    """A node name reduced to characters that are safe in file names on every platform."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    return cleaned or "volume"


def _describeRecord(record):
    """One status line from a progress record."""
    parts = []
    if record.get("epoch") is not None:
        parts.append(f"epoch {float(record['epoch']):.1f}")
    if record.get("loss") is not None:
        parts.append(f"loss {record['loss']:.4g}")
    if record.get("val_loss") is not None:
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


def _logTail(logPath, lines=5):
    """The last lines of the training log, where the error of a failed run is."""
    try:
        text = Path(logPath).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])
