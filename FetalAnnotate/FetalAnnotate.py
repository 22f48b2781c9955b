"""FetalAnnotate: interactive fetal-MRI segmentation from a few paint strokes (3D Slicer module).

The module panel and the Segment Editor effect "Random forest" are thin: all computation is in
``FetalAnnotateLogic`` (scene I/O, GUI-free) and ``FetalAnnotateLib`` (numpy engine).
"""

import importlib.util
import os
from typing import Annotated

import qt
import vtk

import slicer
from FetalAnnotateLogic import FetalAnnotateLogic
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: Packages FetalAnnotateLib needs that Slicer does not bundle (pip requirement -> import name),
#: installed on first use with the user's consent.
PYTHON_REQUIREMENTS = {"scikit-learn>=1.3": "sklearn", "scikit-image>=0.21": "skimage", "skops>=0.9": "skops"}
#: Keys of FetalAnnotateLib.FEATURE_PRESETS (listed here so the panel loads before scikit-learn is installed).
FEATURE_PRESET_NAMES = ("default", "paper-table1")
MOST_PROBABLE = "(most probable class)"


def missingRequirements(requirements=PYTHON_REQUIREMENTS):
    """The pip requirements (keys of ``requirements``) whose package cannot be imported."""
    return [requirement for requirement, importName in requirements.items()
            if importlib.util.find_spec(importName) is None]


def ensureDependencies(requirements=PYTHON_REQUIREMENTS, requester="FetalAnnotate", askConfirmation=True):
    """Install the missing packages of ``requirements`` (pip requirement -> import name) with
    pip after the user agrees; True when all are importable afterwards. FetalInpaint uses it too.

    Uses ``slicer.packaging.pip_ensure`` (which asks the user itself) on Slicer 5.12 and later,
    else asks here and calls ``slicer.util.pip_install``; ``askConfirmation=False`` (self-tests)
    installs without asking.
    """
    missing = missingRequirements(requirements)
    if not missing:
        return True
    if askConfirmation and (slicer.app.majorVersion, slicer.app.minorVersion) >= (5, 12):
        import slicer.packaging as packaging  # binds only "packaging": "slicer" stays the global module

        packaging.pip_ensure(missing, requester=requester)
    else:
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                f"{requester} needs these Python packages, not yet installed in this Slicer:\n\n"
                + "\n".join(missing) + "\n\nDownload and install them now (once)?",
                windowTitle=f"{requester}: install Python packages"):
            return False
        with slicer.util.WaitCursor():
            slicer.util.pip_install(" ".join(missing))
    importlib.invalidate_caches()
    return not missingRequirements(requirements)


def registerSegmentEditorEffect():
    """Register the "Random forest" Segment Editor effect (done once Slicer has started)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

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
        self.parent.title = "FetalAnnotate"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["FetalAnnotate developers"]
        self.parent.helpText = """
Segment fetal MRI (or any scalar volume) from a few paint strokes. Paint one segment per class
(e.g. "fetus", "placenta", "background") in the Segment Editor, click <b>Train and segment</b>,
add correction strokes, repeat. Results go to segments named "&lt;class&gt; (auto)" and one
probability volume per class; painted segments are never changed. The same engine is available
in the Segment Editor as the <b>Random forest</b> effect. A trained classifier can be saved and
applied to other volumes, here or in batch (see the user guide).
"""
        self.parent.acknowledgementText = """
The method follows the annotation tool for pregnancy MRI of the reference paper (random forest on
multi-scale filter features from one annotated slice, refined by correction rounds).
Built on 3D Slicer's Segmentations module, scikit-learn, scikit-image and skops.
"""
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
    memory - share of the previous round's probabilities in a round that only adds strokes, away from
        the new strokes (it fades in over FetalAnnotateLib.MEMORY_REACH_MM around them; 0: none; a
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


#
# FetalAnnotateWidget
#


class FetalAnnotateWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Module panel: selects inputs, runs the logic with progress and cancel, reports status."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._cancelRequested = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FetalAnnotate.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = FetalAnnotateLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.classSegmentsSelector.connect("segmentSelectionChanged(QStringList)", self.onClassSegmentsChanged)
        # A list of nodes has no automatic GUI connection: the checkable combo box is synchronised by hand.
        self.ui.extraFeatureVolumesSelector.connect("checkedNodesChanged()", self.onExtraFeatureVolumesChanged)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.thresholdClassComboBox.connect("currentIndexChanged(int)", self.onThresholdClassChanged)
        self.ui.thresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.saveClassifierButton.connect("clicked(bool)", self.onSaveClassifier)
        self.ui.applyClassifierButton.connect("clicked(bool)", self.onApplyClassifier)
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
        self.logic = FetalAnnotateLogic()  # drop the image features cached for the closed scene's volumes
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            node.SetAttribute("ModuleName", self.moduleName)
            slicer.mrmlScene.AddNode(node)
        self.setParameterNode(FetalAnnotateParameterNode(node))
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
        parameters = self._parameterNode
        if parameters is None:
            return
        self.ui.classSegmentsSelector.setCurrentNode(parameters.segmentation)
        wasBlocked = self.ui.classSegmentsSelector.blockSignals(True)
        self.ui.classSegmentsSelector.setSelectedSegmentIDs(list(parameters.classSegmentIds))
        self.ui.classSegmentsSelector.blockSignals(wasBlocked)
        checked = {node.GetID() for node in parameters.extraFeatureVolumes}
        wasBlocked = self.ui.extraFeatureVolumesSelector.blockSignals(True)
        for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            self.ui.extraFeatureVolumesSelector.setCheckState(
                node, qt.Qt.Checked if node.GetID() in checked else qt.Qt.Unchecked)
        self.ui.extraFeatureVolumesSelector.blockSignals(wasBlocked)
        ready = bool(parameters.inputVolume and parameters.segmentation)
        self.ui.trainButton.enabled = ready
        self.ui.trainButton.toolTip = ("Train the forest on the painted classes and write the results." if ready
                                       else "Select a source volume and a segmentation with painted classes.")
        classNames = list(self.logic.probabilityVolumeNodes(parameters.inputVolume)) if parameters.inputVolume else []
        wasBlocked = self.ui.thresholdClassComboBox.blockSignals(True)
        self.ui.thresholdClassComboBox.clear()
        self.ui.thresholdClassComboBox.addItems([MOST_PROBABLE] + classNames)
        index = self.ui.thresholdClassComboBox.findText(parameters.thresholdClass)
        self.ui.thresholdClassComboBox.setCurrentIndex(max(index, 0))
        self.ui.thresholdClassComboBox.blockSignals(wasBlocked)
        self.ui.thresholdSlider.enabled = parameters.thresholdClass in classNames
        self.ui.saveClassifierButton.enabled = bool(classNames)
        self.ui.applyClassifierButton.enabled = bool(parameters.inputVolume)

    def onSegmentationChanged(self, node):
        self.ui.classSegmentsSelector.setCurrentNode(node)

    def onClassSegmentsChanged(self, segmentIds):
        if self._parameterNode:
            self._parameterNode.classSegmentIds = list(segmentIds)

    def onExtraFeatureVolumesChanged(self):
        if self._parameterNode:
            self._parameterNode.extraFeatureVolumes = list(self.ui.extraFeatureVolumesSelector.checkedNodes())

    # ------------------------------------------------------------------ actions
    def runWithProgress(self, description, function):
        """Run ``function(progress)`` with the progress bar, the Cancel button and the status line."""
        self._cancelRequested = False
        self.ui.progressBar.value = 0
        self.ui.progressBar.visible = True
        self.ui.cancelButton.visible = True
        self.ui.trainButton.enabled = False
        self.ui.statusLabel.text = description

        def progress(fraction, message):
            self.ui.progressBar.value = int(100 * fraction)
            self.ui.statusLabel.text = f"{description}: {message}"
            slicer.app.processEvents()  # lets Cancel be clicked
            return self._cancelRequested

        try:
            with slicer.util.tryWithErrorDisplay(f"{description} failed.", waitCursor=True):
                return function(progress)
        except Exception as error:  # already shown to the user by tryWithErrorDisplay
            self.ui.statusLabel.text = f"{description} failed: {error}"
            return None
        finally:
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

    def onTrain(self):
        if not ensureDependencies():
            self.ui.statusLabel.text = "scikit-learn, scikit-image and skops are needed: not installed."
            return
        from FetalAnnotateLib import OperationCancelled

        parameters = self._parameterNode
        forest = {"n_estimators": parameters.numberOfTrees, "max_depth": parameters.maxDepth,
                  "min_samples_leaf": parameters.minSamplesLeaf}

        def train(progress):
            try:
                return self.logic.segment(parameters.inputVolume, parameters.segmentation,
                                          list(parameters.classSegmentIds) or None,
                                          outputSegmentationNode=parameters.outputSegmentation,
                                          thresholds=self.thresholds(), masking=self.masking(),
                                          preset=parameters.featurePreset, forestSettings=forest, progress=progress,
                                          extraFeatureNodes=list(parameters.extraFeatureVolumes),
                                          outlineMode=parameters.outlineMode,
                                          smoothness=parameters.smoothness, memory=parameters.memory)
            except OperationCancelled:
                return None

        result = self.runWithProgress("Training", train)
        if result is not None:
            self.ui.statusLabel.text = (f"Segmented {', '.join(result.classNames)}: see the \"(auto)\" segments in "
                                        f"{result.outputSegmentationNode.GetName()}. Add strokes where wrong and "
                                        "train again.")
        elif self._cancelRequested:
            self.ui.statusLabel.text = "Cancelled; nothing was changed."

    def onThresholdClassChanged(self, index):
        text = self.ui.thresholdClassComboBox.currentText
        self._parameterNode.thresholdClass = "" if text == MOST_PROBABLE else text
        self.rethreshold()

    def onThresholdChanged(self, value):
        self._parameterNode.threshold = value  # this slot may run before the parameter node's own connection
        if self._parameterNode.thresholdClass:
            self.rethreshold()

    def rethreshold(self):
        parameters = self._parameterNode
        if not (parameters.inputVolume and parameters.segmentation):
            return
        if not self.logic.probabilityVolumeNodes(parameters.inputVolume):
            return
        with slicer.util.tryWithErrorDisplay("Re-thresholding failed.", waitCursor=True):
            self.logic.rethreshold(parameters.inputVolume, parameters.segmentation, self.thresholds(),
                                   outputSegmentationNode=parameters.outputSegmentation, masking=self.masking())
            self.ui.statusLabel.text = "Result segments updated from the stored probabilities (no retraining)."

    def onSaveClassifier(self):
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Save classifier", "",
                                              "FetalAnnotate classifier (*.skops)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Saving the classifier failed.", waitCursor=True):
            written = self.logic.saveClassifier(self._parameterNode.inputVolume, path)
            self.ui.statusLabel.text = f"Classifier saved to {written}."

    def onApplyClassifier(self):
        if not ensureDependencies():
            return
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Apply saved classifier", "",
                                              "FetalAnnotate classifier (*.skops)")
        if not path:
            return
        parameters = self._parameterNode
        result = self.runWithProgress("Applying the classifier", lambda progress: self.logic.applyClassifier(
            path, parameters.inputVolume, parameters.outputSegmentation, progress=progress,
            extraFeatureNodes=list(parameters.extraFeatureVolumes)))
        if result is not None:
            self.ui.statusLabel.text = (f"Applied {os.path.basename(path)}: segments in "
                                        f"{result.outputSegmentationNode.GetName()}.")


#
# FetalAnnotateTest
#


class FetalAnnotateTest(ScriptedLoadableModuleTest):
    """Self-test in the user's Slicer: a synthetic volume, painted strokes, the logic and the effect."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.assertTrue(ensureDependencies(), "scikit-learn, scikit-image and skops are needed")
        self.test_PresetNamesMatchEngine()
        self.setUp()
        self.test_LogicOnPhantom()
        self.setUp()
        self.test_EffectOnPhantom()

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

    def test_EffectOnPhantom(self):
        from FetalAnnotateLib.metrics import dice

        self.delayDisplay("Random forest effect on a phantom")
        phantom, volume, segmentation, ids = self.makePhantomScene()
        painted = [slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, i, volume) for i in ids]
        editorWidget = slicer.qMRMLSegmentEditorWidget()
        editorWidget.setMRMLScene(slicer.mrmlScene)
        editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editorWidget.setMRMLSegmentEditorNode(editorNode)
        editorWidget.setSegmentationNode(segmentation)
        editorWidget.setSourceVolumeNode(volume)
        editorWidget.setActiveEffectByName("Random forest")
        effect = editorWidget.activeEffect()
        if effect is None:  # e.g. the module was reloaded after startup
            registerSegmentEditorEffect()
            editorWidget.setActiveEffectByName("Random forest")
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
