"""FetalInpaint: self-supervised inpainting pretraining whose encoder features help segment fetal MRI.

The widget is deliberately thin: every computation is in ``FetalInpaintLogic`` (GUI-free, tested
headless against a real MRML scene) and ``FetalInpaintLib`` (numeric core, no Slicer).
"""

import shutil
import sys
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from FetalAnnotateDependencies import (
    ensureRequirements,
    ensureTorch,
    missingRequirements,
    readRequirements,
    torchInstalled,
)
from FetalInpaintLogic import FetalInpaintLogic

CORRUPTOR_NAMES = ["shapes", "holes", "toss"]
DEVICE_NAMES = ["cpu", "cuda"]
POLL_INTERVAL_MS = 1000
#: Packages FetalInpaintLib needs besides torch that Slicer does not bundle, installed on first use with consent.
REQUIREMENTS_FILE = Path(__file__).parent / "Resources" / "FetalInpaint-requirements.txt"


def ensureDependencies():
    """Offer to install the packages of :data:`REQUIREMENTS_FILE` and PyTorch (asking before any download).

    Returns a ``DependencyStatus``; when it is ok, ``import torch`` works. Never raises.
    """
    status = ensureRequirements(REQUIREMENTS_FILE, requester="FetalInpaint")
    return ensureTorch(requester="FetalInpaint") if status.ok else status


#
# FetalInpaint
#


class FetalInpaint(ScriptedLoadableModule):
    """Module description shown by Slicer (Help & Acknowledgement section and module list)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Fetal Inpaint")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["FetalAnnotate"]  # its folder holds the shared install helper
        self.parent.contributors = ["FetalAnnotate developers (FetalAnnotate project)"]
        self.parent.helpText = _("""
Learns fetal anatomy from unlabeled MRI volumes by self-supervised inpainting: parts of each slice
are hidden (random shapes, square holes or single pixels) and an encoder-decoder network learns to
fill them in. The encoder's per-voxel features can then be exported as volumes and used by the
FetalAnnotate module as extra channels, so that fewer paint strokes are needed.
<ul>
<li><b>Pretraining:</b> tick the training volumes, choose the corruptor, hidden fraction, epochs and
device, then Start. Training runs in a background process; progress, loss plot and remaining time
are shown while Slicer stays usable. Stop saves a checkpoint; tick Resume to continue later.</li>
<li><b>Evaluate:</b> PSNR / SSIM of the model on the hidden region and the whole image, next to
mean fill and biharmonic inpainting, on a volume not used for training.</li>
<li><b>Export features:</b> adds the encoder feature maps (optionally reduced by PCA) to the scene in
the geometry of the selected volume.</li>
</ul>
PyTorch is provided by the PyTorch extension and installed, after confirmation, on first use.
See <a href="https://github.com/fetalannotate/SlicerFetalAnnotate/blob/main/docs/inpainting-module.md">the
module documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Based on the self-supervised inpainting pretraining for pregnancy MRI of J. L&eacute;vy, C. Godard and
J.-B. Masson (Institut Pasteur), <i>Towards robust fetus segmentation from MRI imaging: Accelerating
annotations and diving into high semantic features</i>. Uses PyTorch through the SlicerPyTorch
extension (Fernando Perez-Garcia, Andras Lasso) and scikit-image's biharmonic inpainting as a baseline.
""")


#
# FetalInpaintParameterNode
#


@parameterNodeWrapper
class FetalInpaintParameterNode:
    """The module's settings, saved with the scene.

    trainingVolumes - Unlabeled volumes to pretrain on.
    corruptor - How pixels are hidden: random shapes, square holes or a per-pixel toss.
    corruptorStrength - Fraction of each patch that is hidden.
    epochs - Passes over the training patches.
    device - "cpu" or "cuda".
    outputFolder - Where the training writes volumes, checkpoints, progress and log.
    resume - Continue the training found in the output folder.
    checkpointPath - Trained model used to evaluate and export.
    evaluationVolume - Volume to evaluate on and to export features of.
    pcaComponents - Principal components kept on export (0 keeps every channel).
    exportAsVectorVolume - Export one vector volume instead of one scalar volume per channel.
    """

    trainingVolumes: list[vtkMRMLScalarVolumeNode]
    corruptor: Annotated[str, Choice(CORRUPTOR_NAMES)] = "shapes"
    corruptorStrength: Annotated[float, WithinRange(0.05, 0.6)] = 0.2
    epochs: Annotated[int, WithinRange(1, 500)] = 20
    device: Annotated[str, Choice(DEVICE_NAMES)] = "cpu"
    outputFolder: Path
    resume: bool = False
    checkpointPath: Path
    evaluationVolume: vtkMRMLScalarVolumeNode
    pcaComponents: Annotated[int, WithinRange(0, 64)] = 8
    exportAsVectorVolume: bool = False


def _isSet(path):
    """An unset Path parameter reads back as Path('.')."""
    return path is not None and str(path) not in ("", ".")


#
# FetalInpaintWidget
#


class FetalInpaintWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Module panel: binds the .ui to the parameter node and forwards actions to the logic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._trainingRun = None
        self._lossChartNode = None
        self._evaluationTableNode = None
        self._installing = False  # the package installer processes events: no button may start work meanwhile
        self._pollTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FetalInpaint.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = FetalInpaintLogic()

        # The training runs in another process; a timer reads its progress file so the GUI never blocks.
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.timeout.connect(self.onPollTraining)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # A list of nodes has no automatic GUI connection: synchronise the checkable combo box by hand.
        self.ui.trainingVolumesSelector.checkedNodesChanged.connect(self.onTrainingVolumesChanged)
        self.ui.startTrainingButton.clicked.connect(self.onStartTraining)
        self.ui.stopTrainingButton.clicked.connect(self.onStopTraining)
        self.ui.evaluateButton.clicked.connect(self.onEvaluate)
        self.ui.exportFeaturesButton.clicked.connect(self.onExportFeatures)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called on module reload and application exit: no training may outlive the panel."""
        self._pollTimer.stop()
        self.logic.stopAllTrainings(timeout=10.0)  # stop file first, then the process tree is killed
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        # The nodes go with the scene; a running training keeps going and gets a new chart.
        self._lossChartNode = None
        self._evaluationTableNode = None

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(FetalInpaintParameterNode(self.logic.getParameterNode()))
        if not _isSet(self._parameterNode.outputFolder):
            self._parameterNode.outputFolder = Path(slicer.app.defaultScenePath) / "FetalInpaint"
        if not self._parameterNode.evaluationVolume:
            self._parameterNode.evaluationVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    def onTrainingVolumesChanged(self) -> None:
        if self._parameterNode:
            self._parameterNode.trainingVolumes = list(self.ui.trainingVolumesSelector.checkedNodes())

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._updateTrainingVolumeChecks()
        self._updateButtonStates()
        self._updateDeviceLabel()

    def _updateTrainingVolumeChecks(self) -> None:
        """Tick the training volumes of the parameter node, also after a scene is loaded into it."""
        if not self._parameterNode:
            return
        trainingVolumes = self._parameterNode.trainingVolumes
        wasBlocked = self.ui.trainingVolumesSelector.blockSignals(True)
        for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            self.ui.trainingVolumesSelector.setCheckState(
                node, qt.Qt.Checked if node in trainingVolumes else qt.Qt.Unchecked)
        self.ui.trainingVolumesSelector.blockSignals(wasBlocked)

    def _trainingVolumes(self):
        """The ticked training volumes still in the scene (a removed node reads None in the parameter node)."""
        return [node for node in self._parameterNode.trainingVolumes if node is not None]

    def _trainingIsRunning(self):
        return self._trainingRun is not None and self._trainingRun.process.poll() is None

    def _updateButtonStates(self) -> None:
        parameters = self._parameterNode
        running = self._trainingIsRunning()
        canTrain = bool(parameters and self._trainingVolumes() and _isSet(parameters.outputFolder))
        self.ui.startTrainingButton.enabled = canTrain and not running and not self._installing
        self.ui.startTrainingButton.toolTip = (
            _("Training is running.") if running else
            _("Start training in a background process.") if canTrain else
            _("Tick at least one training volume and choose an output folder.")
        )
        self.ui.stopTrainingButton.enabled = running and not self._trainingRun.stopRequested
        haveModel = bool(parameters and _isSet(parameters.checkpointPath) and parameters.evaluationVolume)
        self.ui.evaluateButton.enabled = haveModel and not self._installing
        self.ui.exportFeaturesButton.enabled = haveModel and not self._installing

    def _updateDeviceLabel(self) -> None:
        """Describe the device; torch is never imported here (opening the module must stay fast and safe)."""
        if "torch" in sys.modules and self._parameterNode:
            self.ui.deviceLabel.text = self.logic.deviceDescription(self._parameterNode.device, sys.modules["torch"])
        elif torchInstalled():
            self.ui.deviceLabel.text = _("PyTorch installed (loaded on first use)")
        else:
            self.ui.deviceLabel.text = _("PyTorch not installed yet (asked for on first use)")

    def _ensureDependencies(self):
        """The torch module once every package is installed and loads; else None, with the reason in the status line."""
        self._installing = True
        self._updateButtonStates()
        try:
            status = ensureDependencies()
        finally:
            self._installing = False
            self._updateButtonStates()
        if not status.ok:
            self.ui.statusLabel.text = status.message
            return None
        import torch

        self._updateDeviceLabel()
        return torch

    def _run(self, failureMessage, function):
        """``function()``, or None when it raised: the error is shown in a dialog and the status line,
        never raised into the Qt event loop."""
        try:
            with slicer.util.tryWithErrorDisplay(failureMessage, waitCursor=True):
                return function()
        except Exception as error:  # already shown by tryWithErrorDisplay
            self.ui.statusLabel.text = f"{failureMessage} {error}"
            return None

    # -------------------------------------------------------------- training

    def onStartTraining(self) -> None:
        torch = self._ensureDependencies()
        if torch is None:
            return
        parameters = self._parameterNode
        if parameters.device == "cuda" and not torch.cuda.is_available():
            self.ui.statusLabel.text = _("No CUDA GPU is available to PyTorch: choose the cpu device.")
            return
        owner = self.logic.trainingLockOwner(parameters.outputFolder)
        if owner is not None:
            self.ui.statusLabel.text = _(
                "A training (process {pid} on {host}) is still writing to {folder}: stop it, wait until it ends, "
                "or choose another output folder.").format(pid=owner["pid"], host=owner["host"],
                                                           folder=parameters.outputFolder)
            return
        overwrite = False
        if not parameters.resume and self.logic.hasTrainingOutputs(parameters.outputFolder):
            overwrite = slicer.util.confirmOkCancelDisplay(
                _("{folder} holds an earlier training. Replace it with a new one?\n\n"
                  "Cancel, then tick 'Resume' to continue it instead, or choose another output folder.").format(
                    folder=parameters.outputFolder),
                windowTitle=_("FetalInpaint: replace training?"),
            )
            if not overwrite:
                return
        run = self._run(_("Failed to start the training."), lambda: self.logic.startTraining(
            self._trainingVolumes(),
            parameters.outputFolder,
            corruptor=parameters.corruptor,
            corruptorStrength=parameters.corruptorStrength,
            epochs=parameters.epochs,
            device=parameters.device,
            resume=parameters.resume,
            overwrite=overwrite,
        ))
        if run is not None:
            self._trainingRun = run
            self._lossChartNode = self.logic.updateLossPlot(run, self._lossChartNode)
            slicer.modules.plots.logic().ShowChartInLayout(self._lossChartNode)
            self.ui.trainingProgressBar.value = 0
            self.ui.trainingStatusLabel.text = _("Starting (loading volumes and PyTorch)...")
            self.ui.statusLabel.text = ""
            self._pollTimer.start()
        self._updateButtonStates()

    def onStopTraining(self) -> None:
        if self._trainingIsRunning():
            # The trainer saves a checkpoint and exits; pollTraining kills the process tree if it does not.
            self.logic.requestStop(self._trainingRun)
            self.ui.trainingStatusLabel.text = _("Stopping (saving a checkpoint)...")
        self._updateButtonStates()

    def onPollTraining(self) -> None:
        run = self._trainingRun
        status = self.logic.pollTraining(run)
        if not status.running:
            self._pollTimer.stop()  # first: whatever fails below, an ended run is not polled again
        self.ui.trainingProgressBar.value = int(round(100 * status.fraction))
        self.ui.trainingStatusLabel.text = status.message
        if status.newRecords or not status.running:  # the last validation point comes at the end
            self._lossChartNode = self.logic.updateLossPlot(run, self._lossChartNode)
        if status.running:
            return
        checkpoint = self.logic.findCheckpoint(run.outputDirectory)
        if checkpoint is not None:
            # Through the scene's parameter node, not the panel's: the module may not be shown (the
            # panel then holds none) and the scene may have been closed since the training started.
            FetalInpaintParameterNode(self.logic.getParameterNode()).checkpointPath = checkpoint
        if status.outcome == "failed":
            slicer.util.errorDisplay(status.message, detailedText=_("Full log: {path}").format(path=run.logPath))
        self._updateButtonStates()

    # -------------------------------------------------------------- evaluation and export

    def onEvaluate(self) -> None:
        if self._ensureDependencies() is None:
            return
        parameters = self._parameterNode

        def evaluate():
            self._evaluationTableNode = self.logic.evaluate(
                parameters.checkpointPath,
                [parameters.evaluationVolume],
                corruptors=(parameters.corruptor,),
                strength=parameters.corruptorStrength,
                device=parameters.device,
                tableNode=self._evaluationTableNode,
            )
            self.ui.evaluationTableView.setMRMLTableNode(self._evaluationTableNode)
            return self._evaluationTableNode

        if self._run(_("Evaluation failed."), evaluate) is not None:
            self.ui.statusLabel.text = _("Evaluated on {volume}: see the table.").format(
                volume=parameters.evaluationVolume.GetName())

    def onExportFeatures(self) -> None:
        if self._ensureDependencies() is None:
            return
        parameters = self._parameterNode
        nodes = self._run(_("Feature export failed."), lambda: self.logic.exportFeatures(
            parameters.evaluationVolume,
            parameters.checkpointPath,
            pcaComponents=parameters.pcaComponents,
            asVectorVolume=parameters.exportAsVectorVolume,
            device=parameters.device,
        ))
        if nodes is not None:
            slicer.util.setSliceViewerLayers(
                background=parameters.evaluationVolume, foreground=nodes[0], foregroundOpacity=0.5
            )
            self.ui.statusLabel.text = _("Exported {count} feature volume(s).").format(count=len(nodes))


#
# FetalInpaintTest
#


class FetalInpaintTest(ScriptedLoadableModuleTest):
    """Self-test run by 'Reload and Test': tiny background training on synthetic volumes, then export.

    It skips, downloading nothing, when PyTorch or a package of :data:`REQUIREMENTS_FILE` is
    missing, as under ctest (``--testing``, which runs the ``test_*`` methods directly); "Reload
    and Test" (:meth:`runTest`) first offers to install them.
    """

    def setUp(self):
        missing = missingRequirements(readRequirements(REQUIREMENTS_FILE)) + ([] if torchInstalled() else ["torch"])
        if missing:
            self.skipTest(f"FetalInpaint's self-test needs {', '.join(missing)}: click 'Start' in the module panel "
                          "to install them, then run the test again.")
        slicer.mrmlScene.Clear()

    def runTest(self):
        ensureDependencies()  # asks the user (never in testing mode); setUp skips what still cannot run
        self.setUp()
        self.test_TrainInBackgroundAndExportFeatures()

    @staticmethod
    def _syntheticVolume(name, seed):
        """A textured ellipse on a dark background, thick slices along k, with oblique axes."""
        rng = np.random.default_rng(seed)
        k, j, i = np.mgrid[0:6, 0:64, 0:64].astype(np.float32)
        ellipse = ((j - 32) / 22) ** 2 + ((i - 30 - seed) / 18) ** 2 < 1
        image = 100.0 * ellipse + 20.0 * np.sin(i / 3.0) * np.cos(j / 4.0) + rng.normal(0, 3, k.shape)
        node = slicer.util.addVolumeFromArray(image.astype(np.float32), name=name)
        node.SetSpacing(1.2, 1.2, 4.0)
        node.SetOrigin(10.0, -20.0, 5.0)
        node.SetIJKToRASDirections(0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
        return node

    def test_TrainInBackgroundAndExportFeatures(self):
        self.delayDisplay("Starting the test")
        volumes = [self._syntheticVolume(f"synthetic{seed}", seed) for seed in range(3)]
        outputFolder = Path(slicer.app.temporaryPath) / "FetalInpaintSelfTest"
        shutil.rmtree(outputFolder, ignore_errors=True)
        logic = FetalInpaintLogic()

        run = logic.startTraining(
            volumes, outputFolder, epochs=2, patchSize=32,
            extraArguments=["--base-channels", "4", "--depth", "2", "--batch-size", "16", "--log-every", "1"],
        )
        while run.process.poll() is None:  # keep the GUI alive while the child trains
            slicer.app.processEvents()
            time.sleep(0.1)
        status = logic.pollTraining(run)
        self.assertEqual(status.returnCode, 0, status.message)
        self.assertTrue(run.records, "the training wrote no progress")
        chart = logic.updateLossPlot(run)
        self.assertEqual(chart.GetNumberOfPlotSeriesNodes(), 2)
        self.delayDisplay(status.message)

        checkpoint = logic.findCheckpoint(outputFolder)
        self.assertIsNotNone(checkpoint)
        nodes = logic.exportFeatures(volumes[0], checkpoint, pcaComponents=3)
        self.assertEqual(len(nodes), 3)
        source, exported = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        volumes[0].GetIJKToRASMatrix(source)
        for node in nodes:
            node.GetIJKToRASMatrix(exported)
            for row in range(4):
                for column in range(4):
                    self.assertAlmostEqual(exported.GetElement(row, column), source.GetElement(row, column))
            self.assertTrue(np.isfinite(slicer.util.arrayFromVolume(node)).all())
        self.delayDisplay("Test passed")
