"""Segment Editor effect "Random forest": complete a segmentation from paint strokes, round after round.

Works like "Grow from seeds": paint each class (e.g. "fetus", "background") with Paint or Draw,
click Initialize, correct with more strokes (the preview updates by itself), then Apply. Apply
writes the result to segments named "<class> (auto)"; the painted segments are never changed.
All computation is in FetalAnnotateLogic; this file only connects it to the editor.
"""

import os

import ctk
import qt
import vtk

import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorAutoCompleteEffect

MOST_PROBABLE = "(most probable class)"


class SegmentEditorEffect(AbstractScriptedSegmentEditorAutoCompleteEffect):
    """Random forest on multi-scale image features and stroke distances (FetalAnnotateLib)."""

    def __init__(self, scriptedEffect):
        AbstractScriptedSegmentEditorAutoCompleteEffect.__init__(self, scriptedEffect)
        scriptedEffect.name = "Random forest"  # not translated: modules find effects by name
        scriptedEffect.title = "Random forest"
        self.minimumNumberOfSegments = 2
        self.minimumNumberOfSegmentsWithEditableArea = 2  # a classifier always needs two painted classes
        self.clippedMasterImageDataRequired = False  # the logic reads the whole source volume itself
        self.clippedMaskImageDataRequired = False  # the logic builds the editable area itself
        self.logic = None
        self.lastRound = None  # (classNames, probabilities, strokes, classes, labels) of the last training
        self.thresholdOnly = False  # next preview re-thresholds lastRound instead of retraining

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return """<html>Complete a segmentation from a few paint strokes with a random forest.<p>
<ul style="margin: 0">
<li>Create one segment per class (e.g. <i>fetus</i>, <i>placenta</i>, <i>background</i>) and paint a few
strokes of each with Paint or Draw, on one slice is enough to start.</li>
<li>Click <dfn>Initialize</dfn>. The first run computes image features (seconds to a minute); later
updates reuse them.</li>
<li>Paint corrections where the preview is wrong: it updates by itself a moment later.</li>
<li>Outlined the target with a closed background stroke a few mm outside it? Tick
<dfn>Closed outlines enclose their class</dfn>: what the outline encloses is then taught as the target.</li>
<li>Pick a class and move <dfn>Threshold</dfn> to grow or shrink it without retraining.</li>
<li>Click <dfn>Apply</dfn>: results go to segments "&lt;class&gt; (auto)"; painted segments stay as painted.</li>
</ul><p>Segments named "... (auto)" and hidden segments are not used as classes.</html>"""

    # ------------------------------------------------------------------ options
    def setupOptionsFrame(self):
        AbstractScriptedSegmentEditorAutoCompleteEffect.setupOptionsFrame(self)

        self.thresholdClassComboBox = qt.QComboBox()
        self.thresholdClassComboBox.setToolTip("Class whose probability threshold the slider sets; "
                                               "other classes take the voxels where they are most probable.")
        self.thresholdSlider = ctk.ctkSliderWidget()
        self.thresholdSlider.minimum = 0.0
        self.thresholdSlider.maximum = 1.0
        self.thresholdSlider.singleStep = 0.01
        self.thresholdSlider.decimals = 2
        self.thresholdSlider.value = 0.5
        self.thresholdSlider.tracking = False  # re-threshold when the slider is released, not on every step
        self.thresholdSlider.setToolTip("Voxels whose probability of the chosen class is at least this value "
                                        "(and that connect to its strokes) belong to it. No retraining.")
        thresholdRow = qt.QHBoxLayout()
        thresholdRow.addWidget(self.thresholdClassComboBox)
        thresholdRow.addWidget(self.thresholdSlider)
        self.scriptedEffect.addLabeledOptionsWidget("Threshold:", thresholdRow)

        self.showProbabilitiesCheckBox = qt.QCheckBox("Show probabilities")
        self.showProbabilitiesCheckBox.setToolTip("Show the chosen class's probability map over the slice views.")
        self.scriptedEffect.addOptionsWidget(self.showProbabilitiesCheckBox)

        self.outlineModeCheckBox = qt.QCheckBox("Closed outlines enclose their class")
        self.outlineModeCheckBox.setToolTip(
            "Outline mode: where a segment's strokes form a closed outline around strokes of one other "
            "segment on a slice, teach what the outline encloses (except its outer 4 mm) as that segment. "
            "Draw the outline a few mm outside the target.")
        self.scriptedEffect.addOptionsWidget(self.outlineModeCheckBox)

        self.thresholdClassComboBox.connect("currentIndexChanged(int)", self.onThresholdChanged)
        self.thresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.showProbabilitiesCheckBox.connect("toggled(bool)", self.onShowProbabilitiesToggled)
        self.outlineModeCheckBox.connect("toggled(bool)", self.onOutlineModeToggled)

    def setMRMLDefaults(self):
        AbstractScriptedSegmentEditorAutoCompleteEffect.setMRMLDefaults(self)
        self.scriptedEffect.setParameterDefault("ThresholdClass", "")
        self.scriptedEffect.setParameterDefault("Threshold", 0.5)
        self.scriptedEffect.setParameterDefault("ShowProbabilities", 0)
        self.scriptedEffect.setParameterDefault("OutlineMode", 0)

    def updateGUIFromMRML(self):
        AbstractScriptedSegmentEditorAutoCompleteEffect.updateGUIFromMRML(self)
        classNames = list(self.lastRound[0]) if self.lastRound else []
        thresholdClass = self.scriptedEffect.parameter("ThresholdClass") if self.scriptedEffect.parameterDefined(
            "ThresholdClass") else ""
        wasBlocked = self.thresholdClassComboBox.blockSignals(True)
        self.thresholdClassComboBox.clear()
        self.thresholdClassComboBox.addItems([MOST_PROBABLE] + classNames)
        self.thresholdClassComboBox.setCurrentIndex(max(self.thresholdClassComboBox.findText(thresholdClass), 0))
        self.thresholdClassComboBox.blockSignals(wasBlocked)
        wasBlocked = self.thresholdSlider.blockSignals(True)
        self.thresholdSlider.value = self.scriptedEffect.doubleParameter("Threshold")
        self.thresholdSlider.blockSignals(wasBlocked)
        self.thresholdSlider.enabled = thresholdClass in classNames
        wasBlocked = self.showProbabilitiesCheckBox.blockSignals(True)
        self.showProbabilitiesCheckBox.checked = self.scriptedEffect.integerParameter("ShowProbabilities") != 0
        self.showProbabilitiesCheckBox.blockSignals(wasBlocked)
        wasBlocked = self.outlineModeCheckBox.blockSignals(True)
        self.outlineModeCheckBox.checked = self.scriptedEffect.integerParameter("OutlineMode") != 0
        self.outlineModeCheckBox.blockSignals(wasBlocked)

    def updateMRMLFromGUI(self):
        AbstractScriptedSegmentEditorAutoCompleteEffect.updateMRMLFromGUI(self)
        thresholdClass = self.thresholdClassComboBox.currentText
        self.scriptedEffect.setParameter("ThresholdClass", "" if thresholdClass == MOST_PROBABLE else thresholdClass)
        self.scriptedEffect.setParameter("Threshold", self.thresholdSlider.value)
        self.scriptedEffect.setParameter("ShowProbabilities", 1 if self.showProbabilitiesCheckBox.checked else 0)
        self.scriptedEffect.setParameter("OutlineMode", 1 if self.outlineModeCheckBox.checked else 0)

    def onThresholdChanged(self, *unused):
        self.updateMRMLFromGUI()
        self.thresholdSlider.enabled = self.thresholdClassComboBox.currentText != MOST_PROBABLE
        if self.getPreviewNode() and self.lastRound:
            self.thresholdOnly = True
            self.onPreview()

    def onShowProbabilitiesToggled(self, checked):
        self.updateMRMLFromGUI()
        self.showProbabilities()

    def onOutlineModeToggled(self, checked):
        self.updateMRMLFromGUI()
        if self.getPreviewNode():
            self.onPreview()  # retrain: the outline changes what the forest is taught

    # ------------------------------------------------------------------ computation
    def getLogic(self):
        """The module logic, created on first use after offering to install missing Python packages."""
        if self.logic is None:
            import FetalAnnotate

            if not FetalAnnotate.ensureDependencies():
                raise RuntimeError("The Random forest effect needs scikit-learn, scikit-image and skops; "
                                   "install them when asked, or from the FetalAnnotate module.")
            from FetalAnnotateLogic import FetalAnnotateLogic

            self.logic = FetalAnnotateLogic()
        return self.logic

    def preview(self):
        # Result segments of earlier rounds are outputs, never classes: leave them out of the inputs.
        from FetalAnnotateLogic import AUTO_SUFFIX

        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        if self.selectedSegmentIds is None and segmentationNode is not None:
            visibleIds = vtk.vtkStringArray()
            segmentationNode.GetDisplayNode().GetVisibleSegmentIDs(visibleIds)
            self.selectedSegmentIds = vtk.vtkStringArray()
            segmentation = segmentationNode.GetSegmentation()
            for index in range(visibleIds.GetNumberOfValues()):
                segmentId = visibleIds.GetValue(index)
                if not segmentation.GetSegment(segmentId).GetName().endswith(AUTO_SUFFIX):
                    self.selectedSegmentIds.InsertNextValue(segmentId)
        AbstractScriptedSegmentEditorAutoCompleteEffect.preview(self)

    def computePreviewLabelmap(self, mergedImage, outputLabelmap):
        import numpy as np

        from FetalAnnotateLogic import Masking, classMasks

        logic = self.getLogic()
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        volumeNode = parameterSetNode.GetSourceVolumeNode()
        segmentationNode = parameterSetNode.GetSegmentationNode()
        if not (self.thresholdOnly and self.lastRound):
            selected = self.selectedSegmentIds
            segmentIds = [selected.GetValue(index) for index in range(selected.GetNumberOfValues())]
            strokes, names = logic.strokeLabels(volumeNode, segmentationNode, segmentIds)
            outlineMode = self.scriptedEffect.integerParameter("OutlineMode") != 0
            result = logic.session(volumeNode, progress=self.reportProgress, outlineMode=outlineMode).update(strokes)
            # Label value k of the preview is the k-th selected segment, as the auto-complete base expects.
            self.lastRound = ([names[value - 1] for value in result.classes], result.probabilities, strokes,
                              result.classes, result.labels)
        self.thresholdOnly = False
        classNames, probabilities, strokes, classes, engineLabels = self.lastRound
        thresholdClass = self.scriptedEffect.parameter("ThresholdClass")
        masks = classMasks(probabilities, strokes, classes, classNames, self.thresholds(classNames), engineLabels)
        editable = logic.editableArea(volumeNode, segmentationNode, Masking.fromSegmentEditorNode(parameterSetNode))
        labels = np.zeros(strokes.shape, np.uint8)
        # The thresholded class is written last, so what the slider does is what one sees.
        for value, _, mask in sorted(zip(classes, classNames, masks), key=lambda item: item[1] == thresholdClass):
            labels[mask] = value
        if editable is not None:
            labels[~editable] = 0
        outputLabelmap.DeepCopy(logic.labelmapInSegmentationFrame(volumeNode, segmentationNode, labels))
        self.showProbabilities()

    def thresholds(self, classNames):
        """``{class: threshold}`` for the class chosen in the threshold row, or {} for "most probable"."""
        thresholdClass = self.scriptedEffect.parameter("ThresholdClass")
        if thresholdClass not in classNames:
            return {}
        return {thresholdClass: self.scriptedEffect.doubleParameter("Threshold")}

    def reportProgress(self, fraction, message):
        slicer.util.showStatusMessage(f"Random forest: {message} ({100 * fraction:.0f}%)")
        slicer.app.processEvents(qt.QEventLoop.ExcludeUserInputEvents)
        return False

    def showProbabilities(self):
        """Show or hide the chosen (or last) class's probability map as the slice views' foreground."""
        if not self.lastRound or self.logic is None:
            return
        volumeNode = self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()
        classNames, probabilities = self.lastRound[0], self.lastRound[1]
        shown = self.logic.probabilityVolumeNodes(volumeNode)
        if self.scriptedEffect.integerParameter("ShowProbabilities") == 0:
            for sliceCompositeNode in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
                if sliceCompositeNode.GetForegroundVolumeID() in [node.GetID() for node in shown.values()]:
                    sliceCompositeNode.SetForegroundVolumeID(None)
            return
        nodes = self.logic.writeProbabilityVolumes(volumeNode, probabilities, classNames)
        thresholdClass = self.scriptedEffect.parameter("ThresholdClass")
        node = nodes[classNames.index(thresholdClass)] if thresholdClass in classNames else nodes[-1]
        slicer.util.setSliceViewerLayers(foreground=node, foregroundOpacity=0.5)

    def onApply(self):
        """Write the previewed classes to "<class> (auto)" segments (undoable); painted segments stay as they are."""
        from FetalAnnotateLogic import Masking, classMasks

        if not self.lastRound:
            return
        self.delayedAutoUpdateTimer.stop()
        self.observeSegmentation(False)
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        volumeNode = parameterSetNode.GetSourceVolumeNode()
        segmentationNode = parameterSetNode.GetSegmentationNode()
        classNames, probabilities, strokes, classes, engineLabels = self.lastRound
        masks = classMasks(probabilities, strokes, classes, classNames, self.thresholds(classNames), engineLabels)
        masking = Masking.fromSegmentEditorNode(parameterSetNode)
        editable = self.logic.editableArea(volumeNode, segmentationNode, masking)
        self.scriptedEffect.saveStateForUndo()
        with slicer.util.tryWithErrorDisplay("Random forest: could not write the result segments.", waitCursor=True):
            self.logic.writeResultSegments(volumeNode, segmentationNode, segmentationNode, classNames, masks, editable)
        self.reset()

    def reset(self):
        # The logic (and its cached image features) is kept: the next Initialize is fast.
        self.lastRound = None
        self.thresholdOnly = False
        AbstractScriptedSegmentEditorAutoCompleteEffect.reset(self)
