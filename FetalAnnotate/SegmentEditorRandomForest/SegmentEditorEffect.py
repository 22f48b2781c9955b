"""Segment Editor effect "Random forest": complete a segmentation from paint strokes, round after round.

Works like "Grow from seeds": paint each class (e.g. "fetus", "background") with Paint or Draw,
click Initialize, correct with more strokes (the preview updates by itself), then Apply. Apply
writes the result to segments named "<class> (auto)"; the painted segments are never changed.
The image features, forest, boundary smoothness, round memory, outline mode and extra feature
volumes are the FetalAnnotate module's settings (one source for the panel and the effect), and
the features computed for a volume are shared with the panel (one cache per scene).
All computation is in FetalAnnotateLogic; this file only connects it to the editor.
"""

import logging
import os
from collections import namedtuple

import ctk
import qt
import vtk

import slicer
from slicer.i18n import tr as _
from SegmentEditorEffects import AbstractScriptedSegmentEditorAutoCompleteEffect

MOST_PROBABLE = "(most probable class)"

#: The last training of the effect: what the preview shows, re-thresholds and applies.
TrainedRound = namedtuple("TrainedRound", "volumeNodeId classNames probabilities strokes classes labels")


class SegmentEditorEffect(AbstractScriptedSegmentEditorAutoCompleteEffect):
    """Random forest on multi-scale image features and stroke distances (FetalAnnotateLib)."""

    def __init__(self, scriptedEffect):
        AbstractScriptedSegmentEditorAutoCompleteEffect.__init__(self, scriptedEffect)
        scriptedEffect.name = "Random forest"  # not translated: modules find effects by name
        scriptedEffect.title = _("Random forest")
        self.minimumNumberOfSegments = 2
        self.minimumNumberOfSegmentsWithEditableArea = 2  # a classifier always needs two painted classes
        self.clippedMasterImageDataRequired = False  # the logic reads the whole source volume itself
        self.clippedMaskImageDataRequired = False  # the logic builds the editable area itself
        self.logic = None
        self.lastRound = None  # TrainedRound of the last training
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
        return _("""<html>Complete a segmentation from a few paint strokes with a random forest.<p>
<ul style="margin: 0">
<li>Create one segment per class (e.g. <i>fetus</i>, <i>placenta</i>, <i>background</i>) and paint a few
strokes of each with Paint or Draw, on one slice is enough to start.</li>
<li>Click <dfn>Initialize</dfn>. The first run computes image features (seconds to a minute); later
updates, and the FetalAnnotate module on the same volume, reuse them.</li>
<li>Paint corrections where the preview is wrong: it updates by itself a moment later.</li>
<li>Outlined the target with a closed background stroke a few mm outside it? Tick
<dfn>Closed outlines enclose their class</dfn>: what the outline encloses is then taught as the target.</li>
<li>Pick a class and move <dfn>Threshold</dfn> to grow or shrink it without retraining.</li>
<li>Click <dfn>Apply</dfn>: results go to segments "&lt;class&gt; (auto)"; painted segments stay as painted.</li>
</ul><p>Segments named "... (auto)", results kept as "... (edited)" and hidden segments are not used as
classes. Feature preset, forest, boundary smoothness, round memory, outline mode and extra feature volumes
are the FetalAnnotate module's settings (its <i>Advanced</i> section).<p>
Apply writes only the "&lt;class&gt; (auto)" segments, on the source volume's voxel grid and only inside
the <i>Editable area</i> and <i>Editable intensity range</i>. It never changes other segments, whatever
<i>Modify other segments</i> says: the painted classes must stay as painted to train the next round. An
"(auto)" segment you edited by hand is kept as "&lt;class&gt; (edited)" and the new result gets a fresh
"(auto)" segment. Undo reverts Apply.</html>""")

    # ------------------------------------------------------------------ options
    def setupOptionsFrame(self):
        AbstractScriptedSegmentEditorAutoCompleteEffect.setupOptionsFrame(self)

        self.thresholdClassComboBox = qt.QComboBox()
        self.thresholdClassComboBox.setToolTip(_("Class whose probability threshold the slider sets; "
                                                 "other classes take the voxels where they are most probable."))
        self.thresholdSlider = ctk.ctkSliderWidget()
        self.thresholdSlider.minimum = 0.0
        self.thresholdSlider.maximum = 1.0
        self.thresholdSlider.singleStep = 0.01
        self.thresholdSlider.decimals = 2
        self.thresholdSlider.value = 0.5
        self.thresholdSlider.tracking = False  # re-threshold when the slider is released, not on every step
        self.thresholdSlider.setToolTip(_("Voxels whose probability of the chosen class is at least this value "
                                          "(and that connect to its strokes) belong to it. No retraining."))
        thresholdRow = qt.QHBoxLayout()
        thresholdRow.addWidget(self.thresholdClassComboBox)
        thresholdRow.addWidget(self.thresholdSlider)
        self.scriptedEffect.addLabeledOptionsWidget(_("Threshold:"), thresholdRow)

        self.showProbabilitiesCheckBox = qt.QCheckBox(_("Show probabilities"))
        self.showProbabilitiesCheckBox.setToolTip(_("Show the chosen class's probability map over the slice views."))
        self.scriptedEffect.addOptionsWidget(self.showProbabilitiesCheckBox)

        self.outlineModeCheckBox = qt.QCheckBox(_("Closed outlines enclose their class"))
        self.outlineModeCheckBox.setToolTip(_(
            "Outline mode: where a segment's strokes form a closed outline around strokes of one other "
            "segment on a slice, teach what the outline encloses (except its outer 4 mm) as that segment. "
            "Draw the outline a few mm outside the target. The same setting as in the FetalAnnotate module."))
        self.scriptedEffect.addOptionsWidget(self.outlineModeCheckBox)

        self.settingsLabel = qt.QLabel()
        self.settingsLabel.wordWrap = True
        self.settingsLabel.setToolTip(_("Change these in the FetalAnnotate module, section Advanced."))
        self.scriptedEffect.addOptionsWidget(self.settingsLabel)

        self.thresholdClassComboBox.connect("currentIndexChanged(int)", self.onThresholdChanged)
        self.thresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.showProbabilitiesCheckBox.connect("toggled(bool)", self.onShowProbabilitiesToggled)
        self.outlineModeCheckBox.connect("toggled(bool)", self.onOutlineModeToggled)

    def setMRMLDefaults(self):
        AbstractScriptedSegmentEditorAutoCompleteEffect.setMRMLDefaults(self)
        # No default for "ThresholdClass": an empty value is not stored (setCommonParameter), read it
        # with thresholdClass().
        self.scriptedEffect.setParameterDefault("Threshold", 0.5)
        self.scriptedEffect.setParameterDefault("ShowProbabilities", 0)

    def thresholdClass(self):
        """The class the threshold applies to; "" for "most probable class" (also when never set)."""
        if not self.scriptedEffect.parameterDefined("ThresholdClass"):
            return ""
        return self.scriptedEffect.parameter("ThresholdClass")

    def updateGUIFromMRML(self):
        AbstractScriptedSegmentEditorAutoCompleteEffect.updateGUIFromMRML(self)
        import FetalAnnotate

        if self.getPreviewNode() is None:
            # No preview to re-threshold or apply (e.g. the scene was closed): free the last round.
            self.lastRound = None
        classNames = list(self.lastRound.classNames) if self.lastRound else []
        thresholdClass = self.thresholdClass()
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

        parameters = FetalAnnotate.getParameterNode()
        wasBlocked = self.outlineModeCheckBox.blockSignals(True)
        self.outlineModeCheckBox.checked = parameters.outlineMode
        self.outlineModeCheckBox.blockSignals(wasBlocked)
        extraVolumes = ", ".join(node.GetName() for node in FetalAnnotate.extraFeatureVolumes(parameters)) or _("none")
        self.settingsLabel.text = _(
            "FetalAnnotate module settings: features '{preset}', {trees} trees of depth {depth} (leaf {leaf}), "
            "boundary smoothness {smoothness:g}, round memory {memory:g}, extra feature volumes: {extra}.").format(
            preset=parameters.featurePreset, trees=parameters.numberOfTrees, depth=parameters.maxDepth,
            leaf=parameters.minSamplesLeaf, smoothness=parameters.smoothness, memory=parameters.memory,
            extra=extraVolumes)

    def updateMRMLFromGUI(self):
        AbstractScriptedSegmentEditorAutoCompleteEffect.updateMRMLFromGUI(self)
        thresholdClass = self.thresholdClassComboBox.currentText
        self.scriptedEffect.setParameter("ThresholdClass", "" if thresholdClass == MOST_PROBABLE else thresholdClass)
        self.scriptedEffect.setParameter("Threshold", self.thresholdSlider.value)
        self.scriptedEffect.setParameter("ShowProbabilities", 1 if self.showProbabilitiesCheckBox.checked else 0)

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
        import FetalAnnotate

        FetalAnnotate.getParameterNode().outlineMode = checked
        if self.getPreviewNode():
            self.onPreview()  # retrain: the outline changes what the forest is taught

    # ------------------------------------------------------------------ computation
    def getLogic(self):
        """The module logic, created on first use after offering to install missing Python packages.

        Every logic of a scene shares its cached image features (the module panel's too).
        """
        if self.logic is None:
            import FetalAnnotate

            status = FetalAnnotate.ensureDependencies()
            if not status.ok:
                raise RuntimeError(status.message)  # shown by the auto-complete base's error display
            from FetalAnnotateLogic import FetalAnnotateLogic

            self.logic = FetalAnnotateLogic()
        return self.logic

    def preview(self):
        # Result segments of earlier rounds are outputs, never classes: leave them out of the inputs.
        from FetalAnnotateLogic import FetalAnnotateLogic

        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        if self.selectedSegmentIds is None and segmentationNode is not None:
            visibleIds = vtk.vtkStringArray()
            segmentationNode.GetDisplayNode().GetVisibleSegmentIDs(visibleIds)
            self.selectedSegmentIds = vtk.vtkStringArray()
            for index in range(visibleIds.GetNumberOfValues()):
                segmentId = visibleIds.GetValue(index)
                if not FetalAnnotateLogic.isResultSegment(segmentationNode, segmentId):
                    self.selectedSegmentIds.InsertNextValue(segmentId)
        AbstractScriptedSegmentEditorAutoCompleteEffect.preview(self)

    def onPreview(self):
        """The base's preview, which shows an error in a dialog and re-raises it; a Qt slot must not raise."""
        try:
            AbstractScriptedSegmentEditorAutoCompleteEffect.onPreview(self)
        except Exception:
            logging.exception("Random forest: the preview failed")

    def selectedClassSegmentIds(self):
        """IDs of the class segments of this preview, in label order."""
        selected = self.selectedSegmentIds
        return [selected.GetValue(index) for index in range(selected.GetNumberOfValues())]

    def editableArea(self, volumeNode, segmentationNode):
        """The Segment Editor's editable area and intensity range on the volume's grid (None: everywhere)."""
        from FetalAnnotateLogic import Masking

        masking = Masking.fromSegmentEditorNode(self.scriptedEffect.parameterSetNode())
        return self.getLogic().editableArea(volumeNode, segmentationNode, masking,
                                            classSegmentIds=self.selectedClassSegmentIds())

    def computePreviewLabelmap(self, mergedImage, outputLabelmap):
        import numpy as np

        import FetalAnnotate
        from FetalAnnotateLogic import classMasks

        logic = self.getLogic()
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        volumeNode = parameterSetNode.GetSourceVolumeNode()
        segmentationNode = parameterSetNode.GetSegmentationNode()
        if not (self.thresholdOnly and self.lastRoundOf(volumeNode)):
            strokes, names = logic.strokeLabels(volumeNode, segmentationNode, self.selectedClassSegmentIds())
            settings = FetalAnnotate.trainingSettings(FetalAnnotate.getParameterNode())
            # Label value k of the preview is the k-th selected segment, as the auto-complete base expects.
            result, classNames = logic.train(volumeNode, strokes, names, progress=self.reportProgress, **settings)
            self.lastRound = TrainedRound(volumeNode.GetID(), classNames, result.probabilities, strokes,
                                          result.classes, result.labels)
        self.thresholdOnly = False
        _volumeNodeId, classNames, probabilities, strokes, classes, engineLabels = self.lastRound
        thresholdClass = self.thresholdClass()
        masks = classMasks(probabilities, strokes, classes, classNames, self.thresholds(classNames), engineLabels)
        editable = self.editableArea(volumeNode, segmentationNode)
        labels = np.zeros(strokes.shape, np.uint8)
        # The thresholded class is written last, so what the slider does is what one sees.
        for value, _name, mask in sorted(zip(classes, classNames, masks), key=lambda item: item[1] == thresholdClass):
            labels[mask] = value
        if editable is not None:
            labels[~editable] = 0
        outputLabelmap.DeepCopy(logic.labelmapInSegmentationFrame(volumeNode, segmentationNode, labels))
        self.showProbabilities()

    def lastRoundOf(self, volumeNode):
        """The last training if it was on ``volumeNode`` (the source volume may have changed since), else None."""
        if self.lastRound is None or volumeNode is None or self.lastRound.volumeNodeId != volumeNode.GetID():
            return None
        return self.lastRound

    def thresholds(self, classNames):
        """``{class: threshold}`` for the class chosen in the threshold row, or {} for "most probable"."""
        thresholdClass = self.thresholdClass()
        if thresholdClass not in classNames:
            return {}
        return {thresholdClass: self.scriptedEffect.doubleParameter("Threshold")}

    def reportProgress(self, fraction, message):
        slicer.util.showStatusMessage(_("Random forest: {message} ({percent:.0f}%)").format(
            message=message, percent=100 * fraction))
        slicer.app.processEvents(qt.QEventLoop.ExcludeUserInputEvents)
        return False

    def showProbabilities(self):
        """Show or hide the chosen (or last) class's probability map as the slice views' foreground."""
        volumeNode = self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()
        if self.logic is None or self.lastRoundOf(volumeNode) is None:
            return
        classNames, probabilities = self.lastRound.classNames, self.lastRound.probabilities
        shown = self.logic.probabilityVolumeNodes(volumeNode)
        if self.scriptedEffect.integerParameter("ShowProbabilities") == 0:
            for sliceCompositeNode in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
                if sliceCompositeNode.GetForegroundVolumeID() in [node.GetID() for node in shown.values()]:
                    sliceCompositeNode.SetForegroundVolumeID(None)
            return
        nodes = self.logic.writeProbabilityVolumes(volumeNode, probabilities, classNames,
                                                   strokes=self.lastRound.strokes, classes=self.lastRound.classes)
        thresholdClass = self.thresholdClass()
        node = nodes[classNames.index(thresholdClass)] if thresholdClass in classNames else nodes[-1]
        slicer.util.setSliceViewerLayers(foreground=node, foregroundOpacity=0.5)

    def onApply(self):
        """Write the previewed classes to "<class> (auto)" segments (undoable); no other segment is modified.

        Unlike the auto-complete base, which writes each preview segment into its input segment with
        ``modifySegmentByLabelmap`` (so the editor's overwrite mode would erase painted strokes), the
        results go through ``FetalAnnotateLogic.writeResultSegments``: painted classes are never
        modified and a hand-edited "(auto)" segment is kept. The editable area and intensity range
        are applied by :meth:`editableArea`.
        """
        from FetalAnnotateLogic import classMasks

        if not self.lastRound:
            return
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        volumeNode = parameterSetNode.GetSourceVolumeNode()
        segmentationNode = parameterSetNode.GetSegmentationNode()
        if self.lastRoundOf(volumeNode) is None:
            slicer.util.errorDisplay(_("Random forest: the source volume changed since the preview was computed. "
                                       "Click Update (or Initialize) to compute it on this volume, then Apply."))
            return
        self.delayedAutoUpdateTimer.stop()
        self.observeSegmentation(False)
        _volumeNodeId, classNames, probabilities, strokes, classes, engineLabels = self.lastRound
        try:
            with slicer.util.tryWithErrorDisplay(_("Random forest: could not write the result segments."),
                                                 waitCursor=True):
                masks = classMasks(probabilities, strokes, classes, classNames, self.thresholds(classNames),
                                   engineLabels)
                editable = self.editableArea(volumeNode, segmentationNode)
                self.scriptedEffect.saveStateForUndo()
                self.logic.writeResultSegments(volumeNode, segmentationNode, segmentationNode, classNames, masks,
                                               editable)
        except Exception:  # shown to the user by tryWithErrorDisplay; keep the preview to try again
            self.observeSegmentation(self.autoUpdateCheckBox.isChecked())
            return
        self.reset()

    def reset(self):
        # The logic (and the scene's cached image features) is kept: the next Initialize is fast.
        self.lastRound = None
        self.thresholdOnly = False
        AbstractScriptedSegmentEditorAutoCompleteEffect.reset(self)
