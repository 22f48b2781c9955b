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
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from FetalAnnotate import ensureDependencies, missingRequirements
from FetalInpaintLogic import FetalInpaintLogic

CORRUPTOR_NAMES = ["shapes", "holes", "toss"]
DEVICE_NAMES = ["cpu", "cuda"]
POLL_INTERVAL_MS = 1000
#: Packages FetalInpaintLib needs besides torch that Slicer does not bundle (pip requirement -> import name;
#: installed on first use, with consent): scikit-learn for PCA, scikit-image for the biharmonic baseline,
#: matplotlib for the training's loss-curve PNG.
PYTHON_REQUIREMENTS = {"scikit-learn>=1.3": "sklearn", "scikit-image>=0.21": "skimage", "matplotlib>=3.6": "matplotlib"}


#
# FetalInpaint
#


class FetalInpaint(ScriptedLoadableModule):
    """Module description shown by Slicer (Help & Acknowledgement section and module list)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Fetal Inpaint"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["FetalAnnotate"]  # its dependency installer
        self.parent.contributors = ["FetalAnnotate developers"]
        self.parent.helpText = """
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
"""
        self.parent.acknowledgementText = """
Based on the self-supervised inpainting pretraining for fetal MRI described in the seed paper of the
FetalAnnotate project. Uses PyTorch through the SlicerPyTorch extension (Fernando Perez-Garcia,
Andras Lasso) and scikit-image's biharmonic inpainting as a baseline.
"""


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
        self._updateDeviceLabel(self._installedTorch())

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self._pollTimer.stop()
        if self._trainingRun is not None and self._trainingRun.process.poll() is None:
            # Do not leave an orphan training behind; it has saved its last epoch checkpoint.
            self.logic.stopTraining(self._trainingRun, timeout=5.0)
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
            wasBlocked = self.ui.trainingVolumesSelector.blockSignals(True)
            for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
                checked = node in self._parameterNode.trainingVolumes
                self.ui.trainingVolumesSelector.setCheckState(node, qt.Qt.Checked if checked else qt.Qt.Unchecked)
            self.ui.trainingVolumesSelector.blockSignals(wasBlocked)
        self._onParameterNodeModified()

    def onTrainingVolumesChanged(self) -> None:
        if self._parameterNode:
            self._parameterNode.trainingVolumes = list(self.ui.trainingVolumesSelector.checkedNodes())

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._updateButtonStates()
        if "torch" in sys.modules:  # only describe the device once torch is loaded: never import it here
            self._updateDeviceLabel(sys.modules["torch"])

    def _trainingIsRunning(self):
        return self._trainingRun is not None and self._trainingRun.process.poll() is None

    def _updateButtonStates(self) -> None:
        parameters = self._parameterNode
        running = self._trainingIsRunning()
        canTrain = bool(parameters and parameters.trainingVolumes and _isSet(parameters.outputFolder))
        self.ui.startTrainingButton.enabled = canTrain and not running
        self.ui.startTrainingButton.toolTip = (
            "Training is running." if running else
            "Start training in a background process." if canTrain else
            "Tick at least one training volume and choose an output folder."
        )
        self.ui.stopTrainingButton.enabled = running
        haveModel = bool(parameters and _isSet(parameters.checkpointPath) and parameters.evaluationVolume)
        self.ui.evaluateButton.enabled = haveModel
        self.ui.exportFeaturesButton.enabled = haveModel

    # -------------------------------------------------------------- PyTorch

    @staticmethod
    def _installedTorch():
        """The torch module if the PyTorch extension has installed it already, else None (installs nothing)."""
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            return None
        if not PyTorchUtils.PyTorchUtilsLogic.torchInstalled():
            return None
        return PyTorchUtils.PyTorchUtilsLogic().torch

    def _ensureDependencies(self):
        """The torch module once PyTorch and :data:`PYTHON_REQUIREMENTS` are installed (after the user
        confirms each); None if declined or failed."""
        if not ensureDependencies(PYTHON_REQUIREMENTS, requester="FetalInpaint"):
            return None
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            slicer.util.errorDisplay(
                "FetalInpaint needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, "
                "restart Slicer and try again."
            )
            return None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            if not slicer.util.confirmOkCancelDisplay(
                "FetalInpaint needs PyTorch, which is not installed yet. Download and install it now? "
                "This can take several minutes and a few gigabytes of disk space.",
                windowTitle="Install PyTorch",
            ):
                return None
            with slicer.util.tryWithErrorDisplay("Failed to install PyTorch.", waitCursor=True):
                if torchLogic.installTorch(askConfirmation=False) is None:
                    return None
        torch = torchLogic.torch
        self._updateDeviceLabel(torch)
        return torch

    def _updateDeviceLabel(self, torch) -> None:
        if torch is None:
            self.ui.deviceLabel.text = "PyTorch not installed yet (asked for on first use)"
        elif self._parameterNode:
            self.ui.deviceLabel.text = self.logic.deviceDescription(self._parameterNode.device, torch)

    # -------------------------------------------------------------- training

    def onStartTraining(self) -> None:
        torch = self._ensureDependencies()
        if torch is None:
            return
        parameters = self._parameterNode
        if parameters.device == "cuda" and not torch.cuda.is_available():
            slicer.util.errorDisplay("No CUDA GPU is available to PyTorch: choose the cpu device.")
            return
        overwrite = False
        if not parameters.resume and self.logic.hasTrainingOutputs(parameters.outputFolder):
            overwrite = slicer.util.confirmOkCancelDisplay(
                f"{parameters.outputFolder} holds an earlier training. Replace it with a new one?\n\n"
                "Cancel, then tick 'Resume' to continue it instead, or choose another output folder.",
                windowTitle="FetalInpaint: replace training?",
            )
            if not overwrite:
                return
        with slicer.util.tryWithErrorDisplay("Failed to start the training.", waitCursor=True):
            self._trainingRun = self.logic.startTraining(
                parameters.trainingVolumes,
                parameters.outputFolder,
                corruptor=parameters.corruptor,
                corruptorStrength=parameters.corruptorStrength,
                epochs=parameters.epochs,
                device=parameters.device,
                resume=parameters.resume,
                overwrite=overwrite,
            )
            self._lossChartNode = self.logic.updateLossPlot(self._trainingRun, self._lossChartNode)
            slicer.modules.plots.logic().ShowChartInLayout(self._lossChartNode)
            self.ui.trainingProgressBar.value = 0
            self.ui.trainingStatusLabel.text = "Starting (loading volumes and PyTorch)..."
            self._pollTimer.start()
        self._updateButtonStates()

    def onStopTraining(self) -> None:
        if self._trainingIsRunning():
            self.logic.requestStop(self._trainingRun)
            self.ui.stopTrainingButton.enabled = False
            self.ui.trainingStatusLabel.text = "Stopping..."

    def onPollTraining(self) -> None:
        status = self.logic.pollTraining(self._trainingRun)
        if status.newRecords:
            self._lossChartNode = self.logic.updateLossPlot(self._trainingRun, self._lossChartNode)
        self.ui.trainingProgressBar.value = int(round(100 * status.fraction))
        self.ui.trainingStatusLabel.text = status.message
        if status.running:
            return
        self._pollTimer.stop()
        self._lossChartNode = self.logic.updateLossPlot(self._trainingRun, self._lossChartNode)  # last validation point
        checkpoint = self.logic.findCheckpoint(self._trainingRun.outputDirectory)
        if checkpoint is not None:
            self._parameterNode.checkpointPath = checkpoint
        if status.returnCode != 0 and not status.stopped:
            slicer.util.errorDisplay(
                status.message, detailedText=f"Full log: {self._trainingRun.logPath}"
            )
        self._updateButtonStates()

    # -------------------------------------------------------------- evaluation and export

    def onEvaluate(self) -> None:
        if self._ensureDependencies() is None:
            return
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Evaluation failed.", waitCursor=True):
            self._evaluationTableNode = self.logic.evaluate(
                parameters.checkpointPath,
                [parameters.evaluationVolume],
                corruptors=(parameters.corruptor,),
                strength=parameters.corruptorStrength,
                device=parameters.device,
                tableNode=self._evaluationTableNode,
            )
            self.ui.evaluationTableView.setMRMLTableNode(self._evaluationTableNode)

    def onExportFeatures(self) -> None:
        if self._ensureDependencies() is None:
            return
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Feature export failed.", waitCursor=True):
            nodes = self.logic.exportFeatures(
                parameters.evaluationVolume,
                parameters.checkpointPath,
                pcaComponents=parameters.pcaComponents,
                asVectorVolume=parameters.exportAsVectorVolume,
                device=parameters.device,
            )
            slicer.util.setSliceViewerLayers(
                background=parameters.evaluationVolume, foreground=nodes[0], foregroundOpacity=0.5
            )
            slicer.util.showStatusMessage(f"Exported {len(nodes)} feature volume(s).", 5000)


#
# FetalInpaintTest
#


class FetalInpaintTest(ScriptedLoadableModuleTest):
    """Self-test run by 'Reload and Test': tiny background training on synthetic volumes, then export."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
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
        import PyTorchUtils

        torch = PyTorchUtils.PyTorchUtilsLogic().torch  # installs PyTorch if needed (no confirmation in testing mode)
        self.assertIsNotNone(torch, "PyTorch is needed: install it from the PyTorch Utils module")
        self.assertTrue(ensureDependencies(PYTHON_REQUIREMENTS, "FetalInpaint", askConfirmation=False),
                        f"could not install {missingRequirements(PYTHON_REQUIREMENTS)}")

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
