"""FetalAnnotate: interactive fetal-MRI segmentation from a few paint strokes (3D Slicer module).

The module panel and the Segment Editor effect "Random forest" are thin: all computation is in
``FetalAnnotateLogic`` (scene I/O, GUI-free) and ``FetalAnnotateLib`` (numpy engine).
"""

import os
from typing import Annotated

import qt
import vtk

import slicer
from FetalAnnotateDependencies import ensureRequirements, missingRequirements, readRequirements
from FetalAnnotateLogic import FetalAnnotateLogic
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: Packages FetalAnnotateLib needs that Slicer does not bundle, installed on first use with the user's consent.
REQUIREMENTS_FILE = os.path.join(os.path.dirname(__file__), "Resources", "FetalAnnotate-requirements.txt")
#: Keys of FetalAnnotateLib.FEATURE_PRESETS (listed here so the panel loads before scikit-learn is installed).
FEATURE_PRESET_NAMES = ("default", "paper-table1")
MOST_PROBABLE = "(most probable class)"
EFFECT_NAME = "Random forest"


def ensureDependencies():
    """Offer to install the missing packages of :data:`REQUIREMENTS_FILE`; a DependencyStatus, never raises."""
    return ensureRequirements(REQUIREMENTS_FILE, requester="FetalAnnotate")


def registerSegmentEditorEffect():
    """Register the "Random forest" Segment Editor effect unless it is registered already.

    Editor widgets copy the registered effects when they are created
    (``qMRMLSegmentEditorWidget::updateEffectList``), so register before creating one.
    """
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    factory = slicer.qSlicerSegmentEditorEffectFactory.instance()
    if any(effect.name == EFFECT_NAME for effect in factory.registeredEffects()):
        return
    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    effectPath = os.path.join(os.path.dirname(__file__), "SegmentEditorRandomForest", "SegmentEditorEffect.py")
    instance.setPythonSource(effectPath.replace("\\", "/"))
    instance.self().register()


#
# FetalAnnotate
#


class FetalAnnotate(ScriptedLoadableModule):
    """Module description; registers the Segment Editor effect at startup."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("FetalAnnotate")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["FetalAnnotate developers (FetalAnnotate project)"]
        self.parent.helpText = _("""
Segment fetal MRI (or any scalar volume) from a few paint strokes. Paint one segment per class
(e.g. "fetus", "placenta", "background") in the Segment Editor, click <b>Train and segment</b>,
add correction strokes, repeat. Results go to segments named "&lt;class&gt; (auto)" and one
probability volume per class; painted segments are never changed, and an "(auto)" segment you
edited by hand is kept as "&lt;class&gt; (edited)". The same engine, with this panel's feature and
forest settings, is available in the Segment Editor as the <b>Random forest</b> effect. A trained
classifier can be saved and applied to other volumes, here or in batch. See the
<a href="https://github.com/fetalannotate/SlicerFetalAnnotate/blob/main/docs/user-guide.md">user guide</a>.
""")
        self.parent.acknowledgementText = _("""
The method follows the annotation tool for pregnancy MRI of J. L&eacute;vy, C. Godard and J.-B. Masson
(Institut Pasteur), <i>Towards robust fetus segmentation from MRI imaging: Accelerating annotations
and diving into high semantic features</i>: a random forest on multi-scale filter features from one
annotated slice, refined by correction rounds. Built on 3D Slicer's Segmentations module,
scikit-learn, scikit-image, skops and numba.
""")
        slicer.app.connect("startupCompleted()", registerSegmentEditorEffect)


#
# FetalAnnotateParameterNode
#


@parameterNodeWrapper
class FetalAnnotateParameterNode:
    """Settings of the module panel, saved with the scene.

    inputVolume - the volume to segment.
    segmentation - the segmentation holding the painted class segments.
    classSegmentIds - segments used as classes; empty: every segment not named "... (auto)".
    outputSegmentation - where "<class> (auto)" segments go; None: ``segmentation``.
    useEditorMasking - write results only inside the Segment Editor's editable area / intensity range.
    outlineMode - closed stroke outlines teach their inside as the class scribbled in it (see the user guide).
    featurePreset - image features (FetalAnnotateLib.FEATURE_PRESETS).
    numberOfTrees, maxDepth, minSamplesLeaf - random forest settings.
    smoothness - weight of the graph-cut boundary term that smooths the result along image edges (0: none).
    memory - share of the previous round's probabilities in a round with the same classes, away from
        the strokes painted or erased since (it fades in over FetalAnnotateLib.MEMORY_REACH_MM around them; 0: none; a
        single-plane image is never blended).
    extraFeatureVolumes - feature maps on the source volume's grid added as extra feature channels
        (scalar volumes: one channel, vector volumes: one per component), e.g. exported by FetalInpaint.
    thresholdClass - class the threshold applies to; "": every class takes its most probable voxels.
    threshold - probability threshold of ``thresholdClass``.
    """

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    segmentation: slicer.vtkMRMLSegmentationNode
    classSegmentIds: list[str]
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    useEditorMasking: bool = False
    outlineMode: bool = False
    featurePreset: Annotated[str, Choice(FEATURE_PRESET_NAMES)] = "default"
    numberOfTrees: Annotated[int, WithinRange(1, 500)] = 24
    maxDepth: Annotated[int, WithinRange(1, 100)] = 16
    minSamplesLeaf: Annotated[int, WithinRange(1, 100)] = 2
    smoothness: Annotated[float, WithinRange(0.0, 20.0)] = 3.0
    memory: Annotated[float, WithinRange(0.0, 0.9)] = 0.7
    extraFeatureVolumes: list[slicer.vtkMRMLScalarVolumeNode]  # vector volumes are scalar volume subclasses
    thresholdClass: str = ""
    threshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


def getParameterNode():
    """The module's settings in the current scene (singleton node, created when missing), wrapped.

    The panel and the Segment Editor effect both read them: one source of settings.
    """
    node = slicer.mrmlScene.GetSingletonNode("FetalAnnotate", "vtkMRMLScriptedModuleNode")
    if node is None:
        node = slicer.vtkMRMLScriptedModuleNode()
        node.SetSingletonTag("FetalAnnotate")
        node.SetName(slicer.mrmlScene.GenerateUniqueName("FetalAnnotate"))
        node.SetAttribute("ModuleName", "FetalAnnotate")
        node = slicer.mrmlScene.AddNode(node)
    return FetalAnnotateParameterNode(node)


def extraFeatureVolumes(parameters):
    """The ticked extra feature volumes that are still in the scene.

    The parameter node keeps a ticked volume as a node reference: once the volume is removed
    (or was not saved with the scene), the list reads None in its place.
    """
    return [node for node in parameters.extraFeatureVolumes if node is not None]


def trainingSettings(parameters):
    """Keyword arguments of ``FetalAnnotateLogic.session`` and ``segment`` from the module's settings."""
    return {
        "preset": parameters.featurePreset,
        "forestSettings": {"n_estimators": parameters.numberOfTrees, "max_depth": parameters.maxDepth,
                           "min_samples_leaf": parameters.minSamplesLeaf},
        "extraFeatureNodes": extraFeatureVolumes(parameters),
        "outlineMode": parameters.outlineMode,
        "smoothness": parameters.smoothness,
        "memory": parameters.memory,
    }


#
# FetalAnnotateWidget
#


class FetalAnnotateWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Module panel: selects inputs, runs the logic with progress and cancel, reports status.

    Work starts only from a user's click or edit: the widgets the parameter node wrapper writes
    (``SlicerParameterName`` in the .ui) emit their change signals when a scene is loaded, so no
    slot that computes is connected to them; the threshold row is synchronised by hand instead.
    """

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._cancelRequested = False
        self._busy = False  # a long operation runs; its progress callback processes events

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FetalAnnotate.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = FetalAnnotateLogic()  # shares the scene's feature cache with the Segment Editor effect

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.classSegmentsSelector.connect("segmentSelectionChanged(QStringList)", self.onClassSegmentsChanged)
        # A list of nodes has no automatic GUI connection: the checkable combo box is synchronised by hand.
        self.ui.extraFeatureVolumesSelector.connect("checkedNodesChanged()", self.onExtraFeatureVolumesChanged)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.thresholdClassComboBox.connect("currentIndexChanged(int)", self.onThresholdClassChanged)
        self.ui.thresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.saveClassifierButton.connect("clicked(bool)", self.onSaveClassifier)
        self.ui.applyClassifierButton.connect("clicked(bool)", self.onApplyClassifier)
        self.ui.applyClassifierToFilesButton.connect("clicked(bool)", self.onApplyClassifierToFiles)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)

        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()
        self.setParameterNode(None)

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        # The logic frees the closed scene's cached features itself.
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self):
        self.setParameterNode(getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not self._parameterNode.segmentation:
            self._parameterNode.segmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        """Show the parameter node in the widgets that are synchronised by hand (signals blocked) and
        enable what can run now."""
        parameters = self._parameterNode
        if parameters is None:
            return
        wasBlocked = self.ui.classSegmentsSelector.blockSignals(True)
        self.ui.classSegmentsSelector.setCurrentNode(parameters.segmentation)
        self.ui.classSegmentsSelector.setSelectedSegmentIDs(list(parameters.classSegmentIds))
        self.ui.classSegmentsSelector.blockSignals(wasBlocked)
        checked = {node.GetID() for node in extraFeatureVolumes(parameters)}
        wasBlocked = self.ui.extraFeatureVolumesSelector.blockSignals(True)
        for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            self.ui.extraFeatureVolumesSelector.setCheckState(
                node, qt.Qt.Checked if node.GetID() in checked else qt.Qt.Unchecked)
        self.ui.extraFeatureVolumesSelector.blockSignals(wasBlocked)
        classNames = list(self.logic.probabilityVolumeNodes(parameters.inputVolume)) if parameters.inputVolume else []
        wasBlocked = self.ui.thresholdClassComboBox.blockSignals(True)
        self.ui.thresholdClassComboBox.clear()
        self.ui.thresholdClassComboBox.addItems([MOST_PROBABLE] + classNames)
        index = self.ui.thresholdClassComboBox.findText(parameters.thresholdClass)
        self.ui.thresholdClassComboBox.setCurrentIndex(max(index, 0))
        self.ui.thresholdClassComboBox.blockSignals(wasBlocked)
        wasBlocked = self.ui.thresholdSlider.blockSignals(True)
        self.ui.thresholdSlider.value = parameters.threshold
        self.ui.thresholdSlider.blockSignals(wasBlocked)

        # While a long operation runs (its progress callback processes events), nothing else may start.
        idle = not self._busy
        ready = bool(parameters.inputVolume and parameters.segmentation)
        for section in (self.ui.inputsCollapsibleButton, self.ui.advancedCollapsibleButton):
            section.enabled = idle
        self.ui.trainButton.enabled = ready and idle
        self.ui.trainButton.toolTip = _("Train the forest on the painted classes and write the results.") if ready \
            else _("Select a source volume and a segmentation with painted classes.")
        self.ui.thresholdClassComboBox.enabled = idle
        self.ui.thresholdSlider.enabled = idle and parameters.thresholdClass in classNames
        self.ui.saveClassifierButton.enabled = idle and bool(classNames)
        self.ui.applyClassifierButton.enabled = idle and bool(parameters.inputVolume)
        self.ui.applyClassifierToFilesButton.enabled = idle

    def onClassSegmentsChanged(self, segmentIds):
        if self._parameterNode:
            self._parameterNode.classSegmentIds = list(segmentIds)

    def onExtraFeatureVolumesChanged(self):
        if self._parameterNode:
            self._parameterNode.extraFeatureVolumes = list(self.ui.extraFeatureVolumesSelector.checkedNodes())

    # ------------------------------------------------------------------ actions
    def runWithProgress(self, description, function):
        """Run ``function(progress)`` with the progress bar, the Cancel button and the status line.

        First offers to install the packages FetalAnnotateLib needs. Returns ``function``'s result,
        or None when it could not run, failed (the error is shown) or was cancelled; the status
        line says which.
        """
        status = ensureDependencies()
        if not status.ok:
            self.ui.statusLabel.text = status.message
            return None
        from FetalAnnotateLib import OperationCancelled

        self._cancelRequested = False
        self._busy = True
        self.ui.progressBar.value = 0
        self.ui.progressBar.visible = True
        self.ui.cancelButton.visible = True
        self.ui.statusLabel.text = description
        self.updateGUIFromParameterNode()

        def progress(fraction, message):
            self.ui.progressBar.value = int(100 * fraction)
            self.ui.statusLabel.text = f"{description}: {message}"
            slicer.app.processEvents()  # lets Cancel be clicked
            return self._cancelRequested

        try:
            with slicer.util.tryWithErrorDisplay(_("{description} failed.").format(description=description),
                                                 waitCursor=True):
                try:
                    return function(progress)
                except OperationCancelled:
                    self.ui.statusLabel.text = _("Cancelled; nothing was changed.")
                    return None
        except Exception as error:  # already shown to the user by tryWithErrorDisplay
            self.ui.statusLabel.text = _("{description} failed: {error}").format(description=description, error=error)
            return None
        finally:
            self._busy = False
            self.ui.progressBar.visible = False
            self.ui.cancelButton.visible = False
            self.updateGUIFromParameterNode()

    def onCancel(self):
        self._cancelRequested = True

    def masking(self):
        """The Segment Editor's masking settings when the user asked to honour them, else None."""
        from FetalAnnotateLogic import Masking

        if not self._parameterNode.useEditorMasking:
            return None
        editorNode = slicer.mrmlScene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode") or \
            slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentEditorNode")
        return Masking.fromSegmentEditorNode(editorNode) if editorNode else None

    def thresholds(self):
        parameters = self._parameterNode
        return {parameters.thresholdClass: parameters.threshold} if parameters.thresholdClass else None

    def classSegmentIds(self):
        """The ticked class segments that are still in the segmentation; None (every class segment) if none.

        A segment deleted or a segmentation switched while the panel was hidden stays in the saved
        selection, since the selector's signal came when nothing listened.
        """
        parameters = self._parameterNode
        segmentation = parameters.segmentation.GetSegmentation()
        present = [segmentId for segmentId in parameters.classSegmentIds if segmentation.GetSegment(segmentId)]
        return present or None

    def onTrain(self):
        parameters = self._parameterNode
        result = self.runWithProgress(_("Training"), lambda progress: self.logic.segment(
            parameters.inputVolume, parameters.segmentation, self.classSegmentIds(),
            outputSegmentationNode=parameters.outputSegmentation, thresholds=self.thresholds(),
            masking=self.masking(), progress=progress, **trainingSettings(parameters)))
        if result is not None:
            self.ui.statusLabel.text = _(
                'Segmented {classes}: see the "(auto)" segments in {segmentation}. Add strokes where wrong and '
                "train again.").format(classes=", ".join(result.classNames),
                                       segmentation=result.outputSegmentationNode.GetName())
            if result.tookUpWrittenResult:
                self.ui.statusLabel.text = (_("Went on from the result saved with the scene (same strokes). ")
                                            + self.ui.statusLabel.text)

    def onThresholdClassChanged(self, index):
        text = self.ui.thresholdClassComboBox.currentText
        self._parameterNode.thresholdClass = "" if text == MOST_PROBABLE else text
        self.rethreshold()

    def onThresholdChanged(self, value):
        self._parameterNode.threshold = value
        if self._parameterNode.thresholdClass:
            self.rethreshold()

    def rethreshold(self):
        parameters = self._parameterNode
        if not (parameters.inputVolume and parameters.segmentation):
            return
        if not self.logic.probabilityVolumeNodes(parameters.inputVolume):
            return
        result = self.runWithProgress(_("Re-thresholding"), lambda progress: self.logic.rethreshold(
            parameters.inputVolume, parameters.segmentation, self.thresholds(),
            outputSegmentationNode=parameters.outputSegmentation, masking=self.masking()))
        if result is not None:
            self.ui.statusLabel.text = _("Result segments updated from the stored probabilities (no retraining).")

    def onSaveClassifier(self):
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Save classifier"), "",
                                              _("FetalAnnotate classifier (*.skops)"))
        if not path:
            return
        written = self.runWithProgress(_("Saving the classifier"), lambda progress: self.logic.saveClassifier(
            self._parameterNode.inputVolume, path))
        if written is not None:
            self.ui.statusLabel.text = _("Classifier saved to {path}.").format(path=written)

    def onApplyClassifier(self):
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Apply saved classifier"), "",
                                              _("FetalAnnotate classifier (*.skops)"))
        if not path:
            return
        parameters = self._parameterNode
        result = self.runWithProgress(_("Applying the classifier"), lambda progress: self.logic.applyClassifier(
            path, parameters.inputVolume, parameters.outputSegmentation, progress=progress,
            extraFeatureNodes=extraFeatureVolumes(parameters)))
        if result is not None:
            self.ui.statusLabel.text = _("Applied {file}: segments in {segmentation}.").format(
                file=os.path.basename(path), segmentation=result.outputSegmentationNode.GetName())

    def onApplyClassifierToFiles(self):
        window = slicer.util.mainWindow()
        path = qt.QFileDialog.getOpenFileName(window, _("Apply saved classifier to files"), "",
                                              _("FetalAnnotate classifier (*.skops)"))
        if not path:
            return
        inputFolder = qt.QFileDialog.getExistingDirectory(window, _("Folder of the volumes to segment"))
        if not inputFolder:
            return
        outputFolder = qt.QFileDialog.getExistingDirectory(window, _("Folder for the segmentations and the report"))
        if not outputFolder:
            return
        result = self.runWithProgress(_("Segmenting files"), lambda progress: self.logic.applyClassifierToFiles(
            path, inputFolder, outputFolder, progress=progress))
        if result is not None:
            done = sum(item.status == "segmented" for item in result.items)
            self.ui.statusLabel.text = _(
                "Segmented {done} of {total} volumes ({failed} failed, {skipped} files skipped); report: {report}"
            ).format(done=done, total=len(result.items), failed=len(result.failed), skipped=len(result.skipped),
                     report=result.report_csv)


#
# FetalAnnotateTest
#


class FetalAnnotateTest(ScriptedLoadableModuleTest):
    """Self-test in the user's Slicer: a synthetic volume, painted strokes, the logic and the effect.

    Each test skips (downloading nothing) when a package of the requirements file is missing, as
    under ctest (``--testing``, which runs the ``test_*`` methods directly); "Reload and Test"
    (:meth:`runTest`) first offers to install them.
    """

    def setUp(self):
        missing = missingRequirements(readRequirements(REQUIREMENTS_FILE))
        if missing:
            self.skipTest(f"FetalAnnotate's self-test needs {', '.join(missing)}: click 'Train and segment' in the "
                          "module panel to install them, then run the test again.")
        slicer.mrmlScene.Clear()

    def runTest(self):
        ensureDependencies()  # asks the user (never in testing mode); setUp skips what still cannot run
        for test in (self.test_PresetNamesMatchEngine, self.test_RemovedFeatureVolumeIsLeftOut,
                     self.test_LogicOnPhantom, self.test_EffectOnPhantom, self.test_ReloadedSceneGoesOnFromItsResult):
            self.setUp()
            test()

    def makePhantomScene(self):
        """A phantom volume and a segmentation with one painted slice per class."""
        import numpy as np

        from FetalAnnotateLib.phantom import example_strokes, make_phantom

        phantom = make_phantom(shape=(12, 80, 80), seed=3)
        volume = slicer.util.addVolumeFromArray(phantom.image, name="FetalAnnotate phantom")
        volume.SetSpacing(*phantom.spacing[::-1])
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Strokes")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        strokes = example_strokes(phantom.label_map)
        ids = []
        for value in (1, 2, 3):
            segmentId = segmentation.GetSegmentation().AddEmptySegment("", phantom.class_names[value])
            slicer.util.updateSegmentBinaryLabelmapFromArray((strokes == value).astype(np.uint8), segmentation,
                                                             segmentId, volume)
            ids.append(segmentId)
        return phantom, volume, segmentation, ids

    def test_PresetNamesMatchEngine(self):
        from FetalAnnotateLib import FEATURE_PRESETS

        self.assertEqual(set(FEATURE_PRESET_NAMES), set(FEATURE_PRESETS))

    def test_RemovedFeatureVolumeIsLeftOut(self):
        """A ticked extra feature volume removed from the scene reads None in the parameter node."""
        phantom, volume, segmentation, ids = self.makePhantomScene()
        feature = slicer.util.addVolumeFromArray(phantom.image, name="feature")
        parameters = getParameterNode()
        parameters.extraFeatureVolumes = [feature]
        slicer.mrmlScene.RemoveNode(feature)

        self.assertEqual(trainingSettings(parameters)["extraFeatureNodes"], [])
        result = FetalAnnotateLogic().segment(volume, segmentation, **trainingSettings(parameters))
        self.assertEqual(result.classNames, ("background", "fetus", "placenta"))

    def test_LogicOnPhantom(self):
        from FetalAnnotateLib.metrics import dice

        self.delayDisplay("FetalAnnotate logic on a phantom")
        phantom, volume, segmentation, ids = self.makePhantomScene()
        painted = [slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, i, volume) for i in ids]

        result = FetalAnnotateLogic().segment(volume, segmentation)

        self.assertEqual(result.classNames, ("background", "fetus", "placenta"))
        fetus = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, result.resultSegmentIds[1], volume) > 0
        self.assertGreater(dice(fetus, phantom.label_map == 2), 0.5)
        for segmentId, before in zip(ids, painted):
            after = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
            self.assertTrue((after == before).all(), "a painted segment was modified")
        self.delayDisplay("Logic test passed")

    def test_ReloadedSceneGoesOnFromItsResult(self):
        """A scene saved and loaded again: the first round on the same strokes gives the saved result back."""
        import os
        import tempfile

        import numpy as np

        self.delayDisplay("FetalAnnotate: a scene saved and loaded again")
        _phantom, volume, segmentation, _ids = self.makePhantomScene()
        first = FetalAnnotateLogic().segment(volume, segmentation)
        saved = {name: slicer.util.arrayFromVolume(node).copy()
                 for name, node in zip(first.classNames, first.probabilityVolumeNodes)}
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "reloaded.mrb")
            self.assertTrue(slicer.util.saveScene(path), "the scene was not saved")
            slicer.mrmlScene.Clear()  # frees the sessions, as closing the scene does
            slicer.util.loadScene(path)
        volume = slicer.util.getFirstNodeByClassByName("vtkMRMLScalarVolumeNode", "FetalAnnotate phantom")
        segmentation = slicer.util.getFirstNodeByClassByName("vtkMRMLSegmentationNode", "Strokes")
        self.assertIsNotNone(volume)
        self.assertIsNotNone(segmentation)

        again = FetalAnnotateLogic().segment(volume, segmentation)

        self.assertEqual(again.classNames, first.classNames)
        for name, node in zip(again.classNames, again.probabilityVolumeNodes):
            np.testing.assert_allclose(slicer.util.arrayFromVolume(node), saved[name], atol=1e-3)
        self.delayDisplay("Reload test passed")

    def test_EffectOnPhantom(self):
        from FetalAnnotateLib.metrics import dice

        self.delayDisplay("Random forest effect on a phantom")
        phantom, volume, segmentation, ids = self.makePhantomScene()
        painted = [slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, i, volume) for i in ids]
        registerSegmentEditorEffect()  # e.g. the module was reloaded after startup; before the widget copies effects
        editorWidget = slicer.qMRMLSegmentEditorWidget()
        editorWidget.setMRMLScene(slicer.mrmlScene)
        editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editorWidget.setMRMLSegmentEditorNode(editorNode)
        editorWidget.setSegmentationNode(segmentation)
        editorWidget.setSourceVolumeNode(volume)
        editorWidget.setActiveEffectByName(EFFECT_NAME)
        effect = editorWidget.activeEffect()
        self.assertIsNotNone(effect, "the Random forest effect is not registered")

        effect.self().onPreview()
        effect.self().onApply()

        fetusId = segmentation.GetSegmentation().GetSegmentIdBySegmentName("fetus (auto)")
        self.assertTrue(fetusId, "Apply did not create the 'fetus (auto)' segment")
        fetus = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, fetusId, volume) > 0
        self.assertGreater(dice(fetus, phantom.label_map == 2), 0.5)
        for segmentId, before in zip(ids, painted):
            after = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
            self.assertTrue((after == before).all(), "the effect modified a painted segment")
        editorWidget.setActiveEffect(None)
        editorWidget.deleteLater()
        self.delayDisplay("Effect test passed")
