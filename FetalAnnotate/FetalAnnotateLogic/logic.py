"""GUI-free logic of the FetalAnnotate module: strokes in a segmentation node -> segments back.

Usable from Slicer's Python interactor and from tests against a headless MRML scene::

    import FetalAnnotateLogic
    logic = FetalAnnotateLogic.FetalAnnotateLogic()
    volume = slicer.util.getNode("sub-01_run-1_T2w")
    strokes = slicer.util.getNode("Segmentation")      # one segment per class, painted
    result = logic.segment(volume, strokes)             # "<class> (auto)" segments + probability volumes
    features = [slicer.util.getNode("sub-01_run-1_T2w_inpaint")]  # e.g. exported by FetalInpaint
    result = logic.segment(volume, strokes, extraFeatureNodes=features)  # their channels as extra features
    logic.rethreshold(volume, strokes, {"fetus": 0.3})  # no retraining
    logic.saveClassifier(volume, "/tmp/fetus.skops")

Painted segments are only ever read: results go to segments named ``"<class> (auto)"`` and to
one probability volume per class, in the source volume's geometry.

FetalAnnotateLib (which needs scikit-learn) is imported on first use, not when this module is
imported, so Slicer can load the module and offer to install scikit-learn before it is needed.
Errors are ``FetalAnnotateLib.FetalAnnotateError`` subclasses with a message that says what to do.
"""

from dataclasses import dataclass

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

AUTO_SUFFIX = " (auto)"
PROBABILITY_SUFFIX = " probability"
#: Attributes and reference role that tie a probability volume to its class and source volume.
CLASS_NAME_ATTRIBUTE = "FetalAnnotate.ClassName"
CLASS_INDEX_ATTRIBUTE = "FetalAnnotate.ClassIndex"
SOURCE_VOLUME_ROLE = "FetalAnnotateSourceVolume"
_BINARY_LABELMAP = "Binary labelmap"  # vtkSegmentationConverter's binary labelmap representation name
_DEFAULT_COLOR = (0.9, 0.62, 0.0)
# RAS (Slicer) <-> LPS (ITK files) flips the first two axes.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
#: Extra feature volumes must match the source's IJK-to-RAS matrix to this fraction of its smallest
#: spacing: float32 rounding of a file's origin (hundreds of mm) stays below it, a real shift does not.
_GRID_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Masking:
    """Where results may be written: the Segment Editor's "editable area" and intensity range.

    Attributes
    ----------
    maskMode : int
        A ``vtkMRMLSegmentationNode.EditAllowed*`` constant.
    maskSegmentId : str
        Segment of the stroke segmentation used by ``EditAllowedInsideSingleSegment``.
    intensityRange : tuple of float or None
        Only voxels with source intensity in [low, high] are editable; None for no limit.
    """

    maskMode: int = 0  # vtkMRMLSegmentationNode.EditAllowedEverywhere
    maskSegmentId: str = ""
    intensityRange: tuple = None

    @classmethod
    def fromSegmentEditorNode(cls, segmentEditorNode):
        """The masking settings of a ``vtkMRMLSegmentEditorNode`` (what the Segment Editor shows)."""
        intensityRange = None
        if segmentEditorNode.GetSourceVolumeIntensityMask():
            intensityRange = tuple(segmentEditorNode.GetSourceVolumeIntensityMaskRange())
        return cls(segmentEditorNode.GetMaskMode(), segmentEditorNode.GetMaskSegmentID() or "", intensityRange)


@dataclass(frozen=True)
class SegmentResult:
    """What one training round produced.

    Attributes
    ----------
    classNames : tuple of str
        Class names (the stroke segments' names) in class order.
    resultSegmentIds : tuple of str
        IDs of the ``"<class> (auto)"`` segments in ``outputSegmentationNode``, in class order.
    probabilityVolumeNodes : tuple of vtkMRMLScalarVolumeNode
        One probability volume per class, in class order.
    outputSegmentationNode : vtkMRMLSegmentationNode
        Where the result segments are.
    """

    classNames: tuple
    resultSegmentIds: tuple
    probabilityVolumeNodes: tuple
    outputSegmentationNode: object


class _VolumeSession:
    """An AnnotationSession with what it was built from, so it is rebuilt only when those change."""

    def __init__(self, session, key):
        self.session = session
        self.key = key
        self.classNames = None


class FetalAnnotateLogic:
    """Train a random forest on painted segments and write the segmentation back to the scene.

    One :class:`FetalAnnotateLib.AnnotationSession` is kept per source volume, so image features
    are computed once and reused across rounds; it is rebuilt when the volume's voxels, spacing,
    feature preset, forest settings or extra feature volumes (which ones, or their voxels) change.

    Parameters
    ----------
    scene : vtkMRMLScene, optional
        Scene of the nodes; ``slicer.mrmlScene`` when omitted.
    """

    def __init__(self, scene=None):
        self.scene = scene if scene is not None else slicer.mrmlScene
        self._sessions = {}

    # ------------------------------------------------------------------ reading strokes
    @staticmethod
    def classSegmentIds(segmentationNode):
        """IDs of the segments that are classes: every segment not named ``"... (auto)"``, in table order."""
        segmentation = segmentationNode.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(index) for index in range(segmentation.GetNumberOfSegments())]
        return [segmentId for segmentId in ids
                if not segmentation.GetSegment(segmentId).GetName().endswith(AUTO_SUFFIX)]

    def segmentArray(self, volumeNode, segmentationNode, segmentId):
        """A segment as a boolean array (z, y, x) on the volume's voxel grid.

        The segment is resampled (nearest neighbour) from the segmentation's own labelmap
        geometry, through the parent transforms of both nodes, so strokes painted on a
        segmentation of different spacing, extent or orientation land on the right voxels.
        """
        if segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
            raise _lib().FetalAnnotateError(f"segment {segmentId!r} is not in segmentation "
                                            f"{segmentationNode.GetName()!r}")
        labelmap = slicer.vtkOrientedImageData()
        segmentationNode.GetBinaryLabelmapRepresentation(segmentId, labelmap)
        reference = _volumeGeometry(volumeNode)
        extent = labelmap.GetExtent()
        if extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]:
            return np.zeros(_volumeShape(volumeNode), bool)
        resampled = slicer.vtkOrientedImageData()
        segmentationToVolume = _transformBetween(segmentationNode, volumeNode)
        if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                labelmap, reference, resampled, False, False, segmentationToVolume):
            raise _lib().FetalAnnotateError(f"could not resample segment {segmentId!r} onto volume "
                                            f"{volumeNode.GetName()!r}")
        return _orientedImageArray(resampled) > 0

    def strokeLabels(self, volumeNode, segmentationNode, segmentIds=None):
        """The painted segments as one label array on the volume's voxel grid.

        Parameters
        ----------
        volumeNode : vtkMRMLScalarVolumeNode
        segmentationNode : vtkMRMLSegmentationNode
        segmentIds : sequence of str, optional
            The class segments; :meth:`classSegmentIds` when omitted.

        Returns
        -------
        labels : ndarray of uint8, shape (z, y, x)
            0 unpainted, k for ``segmentIds[k - 1]``; where segments overlap, the one higher in
            the segment table wins (as in Slicer's Grow from seeds).
        classNames : list of str
            The segments' names.
        """
        segmentIds = list(segmentIds) if segmentIds is not None else self.classSegmentIds(segmentationNode)
        if len(segmentIds) > 255:
            raise _lib().StrokeError("at most 255 class segments are supported")
        labels = np.zeros(_volumeShape(volumeNode), np.uint8)
        for value in range(len(segmentIds), 0, -1):
            labels[self.segmentArray(volumeNode, segmentationNode, segmentIds[value - 1])] = value
        segmentation = segmentationNode.GetSegmentation()
        return labels, [segmentation.GetSegment(segmentId).GetName() for segmentId in segmentIds]

    def editableArea(self, volumeNode, segmentationNode, masking):
        """Boolean array (z, y, x) of the voxels results may be written to, or None for everywhere.

        Parameters
        ----------
        masking : Masking
            Editable area and intensity range, e.g. ``Masking.fromSegmentEditorNode(editorNode)``.
        """
        if masking is None:
            return None
        editable = None
        if masking.maskMode != slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere:
            transform = _transformBetween(volumeNode, segmentationNode)
            if transform is not None and not slicer.vtkOrientedImageDataResample.IsTransformLinear(transform):
                raise _lib().FetalAnnotateError("masking by segments needs a linear transform between the volume "
                                                "and the segmentation; harden the non-linear transform first")
            reference = _volumeGeometry(volumeNode)
            if transform is not None:
                slicer.vtkOrientedImageDataResample.TransformOrientedImage(reference, transform, True)
            mask = slicer.vtkOrientedImageData()
            if not segmentationNode.GenerateEditMask(mask, masking.maskMode, reference, "", masking.maskSegmentId):
                raise _lib().FetalAnnotateError("could not build the editable area; "
                                                "check the mask segment in the Segment Editor")
            editable = _orientedImageArray(mask) == 0  # the edit mask is non-zero where editing is NOT allowed
        if masking.intensityRange is not None:
            low, high = masking.intensityRange
            image = slicer.util.arrayFromVolume(volumeNode)
            inRange = (image >= low) & (image <= high)
            editable = inRange if editable is None else editable & inRange
        return editable

    # ------------------------------------------------------------------ training and results
    def session(self, volumeNode, preset="default", forestSettings=None, progress=None, extraFeatureNodes=None,
                outlineMode=False, smoothness=None, memory=None):
        """The AnnotationSession of a volume, created (features computed) on first use.

        Parameters
        ----------
        volumeNode : vtkMRMLScalarVolumeNode
        preset : str
            Feature preset (``FetalAnnotateLib.FEATURE_PRESETS``).
        forestSettings : dict, optional
            RandomForestClassifier arguments overriding ``FetalAnnotateLib.DEFAULT_FOREST``.
        progress : callable, optional
            ``progress(fraction, message) -> bool``; True cancels (OperationCancelled).
        extraFeatureNodes : sequence of vtkMRMLScalarVolumeNode, optional
            Feature maps on the volume's voxel grid (scalar volumes give one channel, vector
            volumes one per component), e.g. encoder features exported by FetalInpaint; see
            :meth:`extraFeatureArray`.
        outlineMode : bool
            Where a class's strokes form a closed outline around strokes of one other class on a
            slice, the next updates teach the inside (except its outer
            ``FetalAnnotateLib.OUTLINE_MARGIN_MM``) as that class
            (``AnnotationSession(enclosure_margin_mm=...)``); a setting of each call, not cached.
        smoothness : float, optional
            Weight of the graph-cut boundary term (``AnnotationSession(smoothness=...)``; 0: none);
            ``FetalAnnotateLib.SMOOTHNESS`` when omitted. A setting of each call, not cached.
        memory : float, optional
            Share of the previous round's probabilities in a round that only adds strokes (or
            paints over some with another class), away from the new strokes
            (``AnnotationSession(memory=...)``: it fades in over
            ``FetalAnnotateLib.MEMORY_REACH_MM`` of geodesic distance from them; 0: each round
            starts afresh; a single-slice volume is never blended); ``FetalAnnotateLib.MEMORY``
            when omitted. A setting of each call, not cached.
        """
        key = self._sessionKey(volumeNode, preset, forestSettings, extraFeatureNodes)
        cached = self._sessions.get(volumeNode.GetID())
        if cached is None or cached.key != key:
            self._sessions.pop(volumeNode.GetID(), None)  # free the old features before computing new ones
            session = _lib().AnnotationSession(slicer.util.arrayFromVolume(volumeNode).astype(np.float32),
                                               _volumeSpacing(volumeNode), preset=preset,
                                               extra_features=self.extraFeatureArray(volumeNode, extraFeatureNodes),
                                               forest=forestSettings, progress=progress)
            cached = self._sessions[volumeNode.GetID()] = _VolumeSession(session, key)
        cached.session.progress = progress
        cached.session.enclosure_margin_mm = _lib().OUTLINE_MARGIN_MM if outlineMode else None
        cached.session.smoothness = _lib().SMOOTHNESS if smoothness is None else float(smoothness)
        cached.session.memory = _lib().MEMORY if memory is None else memory  # the setter converts and checks
        return cached.session

    def hasSession(self, volumeNode, preset="default", forestSettings=None, extraFeatureNodes=None):
        """True when the features of ``volumeNode`` for these settings are already computed."""
        cached = self._sessions.get(volumeNode.GetID())
        return cached is not None and cached.key == self._sessionKey(volumeNode, preset, forestSettings,
                                                                     extraFeatureNodes)

    @staticmethod
    def _sessionKey(volumeNode, preset, forestSettings, extraFeatureNodes):
        """What a cached session depends on: voxels, spacing, preset, forest settings and extra feature volumes.

        Checks the extra feature volumes' grids on every call (cheap: no voxels are read), so a
        volume moved after its features were computed is refused even when the session is cached.
        """
        imageData = volumeNode.GetImageData() if volumeNode is not None else None
        if imageData is None or imageData.GetNumberOfPoints() == 0:
            raise _lib().FetalAnnotateError("select a source volume that has voxels")
        if imageData.GetNumberOfScalarComponents() != 1:
            raise _lib().FetalAnnotateError(f"volume {volumeNode.GetName()!r} has several components per voxel; "
                                     "convert it to a scalar volume (e.g. with Vector to Scalar Volume)")
        extraKey = []
        for featureNode in extraFeatureNodes or ():
            _checkSameGrid(volumeNode, featureNode)
            extraKey.append((featureNode.GetID(), featureNode.GetImageData().GetMTime()))
        return (imageData.GetMTime(), volumeNode.GetSpacing(), preset, repr(sorted((forestSettings or {}).items())),
                tuple(extraKey))

    @staticmethod
    def extraFeatureArray(volumeNode, extraFeatureNodes):
        """Extra feature volumes as the ``extra_features`` array of the engine.

        Parameters
        ----------
        volumeNode : vtkMRMLScalarVolumeNode
            Source volume: every feature volume must have its voxel grid (dimensions, spacing,
            origin, axis directions, parent transform); nothing is resampled.
        extraFeatureNodes : sequence of vtkMRMLScalarVolumeNode or None
            Scalar volumes (one channel each) and/or vector volumes (one channel per component),
            stacked in this order.

        Returns
        -------
        ndarray of float32, shape (C, z, y, x), or None
            None when no feature volume is given.

        Raises
        ------
        FetalAnnotateError
            A feature volume without voxels, a diffusion tensor volume, or one on another voxel grid.
        """
        if not extraFeatureNodes:
            return None
        for featureNode in extraFeatureNodes:
            _checkSameGrid(volumeNode, featureNode)
        components = [node.GetImageData().GetNumberOfScalarComponents() for node in extraFeatureNodes]
        features = np.empty((sum(components),) + _volumeShape(volumeNode), np.float32)
        channel = 0
        for featureNode, count in zip(extraFeatureNodes, components):
            array = slicer.util.arrayFromVolume(featureNode)  # (z, y, x) or (z, y, x, components)
            features[channel:channel + count] = np.moveaxis(array, -1, 0) if array.ndim == 4 else array
            channel += count
        return features

    def releaseSession(self, volumeNode):
        """Forget the cached features of a volume (frees memory)."""
        self._sessions.pop(volumeNode.GetID(), None)

    def segment(self, volumeNode, segmentationNode, segmentIds=None, *, outputSegmentationNode=None,
                thresholds=None, masking=None, preset="default", forestSettings=None, progress=None,
                extraFeatureNodes=None, outlineMode=False, smoothness=None, memory=None):
        """Train on the painted segments and write probability volumes and ``"<class> (auto)"`` segments.

        Parameters
        ----------
        volumeNode : vtkMRMLScalarVolumeNode
            Source volume.
        segmentationNode : vtkMRMLSegmentationNode
            Holds the painted class segments (never modified by this method unless it is also the
            output, and then only its ``"(auto)"`` segments are written).
        segmentIds : sequence of str, optional
            Class segments (at least two painted); :meth:`classSegmentIds` when omitted.
        outputSegmentationNode : vtkMRMLSegmentationNode, optional
            Where to write the result segments; ``segmentationNode`` when omitted.
        thresholds : dict, optional
            ``{class name: probability threshold}``; see :meth:`rethreshold`.
        masking : Masking, optional
            Results are written only inside this editable area.
        preset, forestSettings, progress, extraFeatureNodes
            As for :meth:`session`.
        outlineMode, smoothness, memory
            As for :meth:`session`.

        Returns
        -------
        SegmentResult
        """
        strokes, classNames = self.strokeLabels(volumeNode, segmentationNode, segmentIds)
        painted = [name for value, name in enumerate(classNames, start=1) if (strokes == value).any()]
        if len(painted) < 2:
            raise _lib().StrokeError(f"paint at least two class segments (painted: {painted or 'none'}); "
                              "e.g. one inside the target and one around it")
        if len(set(classNames)) != len(classNames):
            raise _lib().StrokeError(f"class segments need distinct names, got {classNames}")
        # One progress bar for both phases: features (first round only), then training and prediction.
        computeFeatures = not self.hasSession(volumeNode, preset, forestSettings, extraFeatureNodes)
        session = self.session(volumeNode, preset, forestSettings,
                               _scaled(progress, 0.0, 0.6) if computeFeatures else None, extraFeatureNodes,
                               outlineMode, smoothness, memory)
        session.progress = _scaled(progress, 0.6, 1.0) if computeFeatures else progress
        result = session.update(strokes)
        classNames = [classNames[value - 1] for value in result.classes]
        self._sessions[volumeNode.GetID()].classNames = tuple(classNames)
        probabilityNodes = self.writeProbabilityVolumes(volumeNode, result.probabilities, classNames)
        outputSegmentationNode = outputSegmentationNode or segmentationNode
        masks = classMasks(result.probabilities, strokes, result.classes, classNames, thresholds, result.labels)
        editable = self.editableArea(volumeNode, segmentationNode, masking)
        resultIds = self.writeResultSegments(volumeNode, segmentationNode, outputSegmentationNode, classNames, masks,
                                              editable)
        return SegmentResult(tuple(classNames), tuple(resultIds), tuple(probabilityNodes), outputSegmentationNode)

    def rethreshold(self, volumeNode, segmentationNode, thresholds=None, *, outputSegmentationNode=None, masking=None):
        """Update the ``"(auto)"`` segments from the stored probability volumes, without retraining.

        Parameters
        ----------
        volumeNode : vtkMRMLScalarVolumeNode
            Source volume whose probability volumes (from :meth:`segment`) are in the scene.
        segmentationNode : vtkMRMLSegmentationNode
            The painted class segments (painted voxels always keep their class).
        thresholds : dict, optional
            ``{class name: t}``: that class's segment becomes the voxels with probability >= t
            that connect to its strokes (it may then overlap other classes). Classes not listed
            get the voxels where they are the most probable class (without the graph-cut
            smoothing of :meth:`segment`, which needs the image features: retrain for it).
        outputSegmentationNode : vtkMRMLSegmentationNode, optional
            Where the result segments are; ``segmentationNode`` when omitted.
        masking : Masking, optional
            Results are written only inside this editable area.

        Returns
        -------
        SegmentResult
        """
        nodes = self.probabilityVolumeNodes(volumeNode)
        if not nodes:
            raise _lib().FetalAnnotateError(f"no probability volumes of {volumeNode.GetName()!r} in the scene; "
                                     "train first ('Train and segment')")
        classNames = list(nodes)
        probabilities = np.stack([slicer.util.arrayFromVolume(node) for node in nodes.values()]).astype(np.float32)
        strokes, strokeNames = self.strokeLabels(volumeNode, segmentationNode)
        # Strokes are matched to probability maps by class name, so renamed or added segments cannot mislabel.
        classStrokes = np.zeros(strokes.shape, np.uint8)
        for value, name in enumerate(strokeNames, start=1):
            if name in classNames:
                classStrokes[strokes == value] = classNames.index(name) + 1
        classes = tuple(range(1, len(classNames) + 1))
        masks = classMasks(probabilities, classStrokes, classes, classNames, thresholds)
        outputSegmentationNode = outputSegmentationNode or segmentationNode
        editable = self.editableArea(volumeNode, segmentationNode, masking)
        resultIds = self.writeResultSegments(volumeNode, segmentationNode, outputSegmentationNode, classNames, masks,
                                              editable)
        return SegmentResult(tuple(classNames), tuple(resultIds), tuple(nodes.values()), outputSegmentationNode)

    def probabilityVolumeNodes(self, volumeNode):
        """``{class name: probability volume node}`` of a source volume, in class order."""
        found = []
        nodes = self.scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
        for index in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(index)
            name = node.GetAttribute(CLASS_NAME_ATTRIBUTE)
            if name and node.GetNodeReferenceID(SOURCE_VOLUME_ROLE) == volumeNode.GetID():
                found.append((int(node.GetAttribute(CLASS_INDEX_ATTRIBUTE)), name, node))
        return {name: node for _, name, node in sorted(found, key=lambda item: item[0])}

    # ------------------------------------------------------------------ classifier files
    def saveClassifier(self, volumeNode, path, metadata=None):
        """Save the classifier last trained on ``volumeNode`` to a ``.skops`` file.

        It uses the image features and any extra feature channels, not the stroke distances, so it
        applies to other volumes (given the same kind of extra feature volumes).

        Returns
        -------
        Path
            The written file.
        """
        cached = self._sessions.get(volumeNode.GetID())
        if cached is None or cached.classNames is None:
            raise _lib().FetalAnnotateError(f"nothing trained on {volumeNode.GetName()!r} yet; "
                                            "run 'Train and segment' first")
        info = {"trainingVolume": volumeNode.GetName(), **(metadata or {})}
        from FetalAnnotateLib.classifier_io import save_classifier

        return save_classifier(path, cached.session.pixel_classifier(), cached.classNames, info)

    def applyClassifier(self, classifierPath, volumeNode, outputSegmentationNode=None, progress=None,
                        extraFeatureNodes=None):
        """Segment a volume with a saved classifier (no strokes needed).

        Writes one probability volume per class and, in ``outputSegmentationNode`` (a new
        segmentation when omitted), one ``"<class> (auto)"`` segment per class holding the voxels
        where that class is the most probable.

        Parameters
        ----------
        classifierPath : str or Path
            A ``.skops`` file written by :meth:`saveClassifier`.
        volumeNode : vtkMRMLScalarVolumeNode
        outputSegmentationNode : vtkMRMLSegmentationNode, optional
        progress : callable, optional
            As for :meth:`session`.
        extraFeatureNodes : sequence of vtkMRMLScalarVolumeNode, optional
            Needed when the classifier was trained with extra feature channels: feature volumes of
            ``volumeNode`` computed the same way (same model, channels and order).

        Returns
        -------
        SegmentResult
        """
        from FetalAnnotateLib.classifier_io import load_classifier

        saved = load_classifier(classifierPath)
        extraFeatures = self.extraFeatureArray(volumeNode, extraFeatureNodes)
        expected = int(saved.classifier.feature_settings.get("n_extra_features", 0))
        given = 0 if extraFeatures is None else len(extraFeatures)
        if given != expected and expected == 0:
            raise _lib().FetalAnnotateError("the classifier was trained without extra features; "
                                            "clear the extra feature volumes")
        if given != expected:
            raise _lib().FetalAnnotateError(
                f"the classifier was trained with {expected} extra feature channels but {given} were selected; "
                f"select feature volumes of {volumeNode.GetName()!r} computed as for training (same model, "
                "channels and order)")
        probabilities = saved.classifier.predict_proba(slicer.util.arrayFromVolume(volumeNode).astype(np.float32),
                                                       _volumeSpacing(volumeNode), progress=progress,
                                                       extra_features=extraFeatures)
        classNames = list(saved.class_names)
        probabilityNodes = self.writeProbabilityVolumes(volumeNode, probabilities, classNames)
        if outputSegmentationNode is None:
            outputSegmentationNode = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                                  f"{volumeNode.GetName()} segmentation")
            outputSegmentationNode.CreateDefaultDisplayNodes()
            outputSegmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        best = np.argmax(probabilities, axis=0)
        masks = [best == index for index in range(len(classNames))]
        resultIds = self.writeResultSegments(volumeNode, None, outputSegmentationNode, classNames, masks, None)
        return SegmentResult(tuple(classNames), tuple(resultIds), tuple(probabilityNodes), outputSegmentationNode)

    def exportSegmentation(self, segmentationNode, segmentIds, volumeNode, path):
        """Write segments to a ``.seg.nrrd`` on the volume's voxel grid (world position, for linear transforms).

        Segments are written in order and a later segment wins where segments overlap.

        Returns
        -------
        Path
            The written file.
        """
        segmentation = segmentationNode.GetSegmentation()
        labels = np.zeros(_volumeShape(volumeNode), np.uint8)
        names, colors = [], []
        for value, segmentId in enumerate(segmentIds, start=1):
            labels[self.segmentArray(volumeNode, segmentationNode, segmentId)] = value
            names.append(segmentation.GetSegment(segmentId).GetName())
            colors.append(segmentation.GetSegment(segmentId).GetColor())
        ijkToRAS = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRAS)
        matrix = slicer.util.arrayFromVTKMatrix(ijkToRAS)
        transformNode = volumeNode.GetParentTransformNode()
        if transformNode is not None and transformNode.IsTransformToWorldLinear():
            toWorld = vtk.vtkMatrix4x4()
            transformNode.GetMatrixTransformToWorld(toWorld)
            matrix = slicer.util.arrayFromVTKMatrix(toWorld) @ matrix
        spacing = np.linalg.norm(matrix[:3, :3], axis=0)
        from FetalAnnotateLib.segio import write_segmentation

        return write_segmentation(path, labels, names, colors=colors, spacing=tuple(spacing[::-1]),
                                  origin=tuple(_RAS_TO_LPS @ matrix[:3, 3]),
                                  direction=_RAS_TO_LPS @ (matrix[:3, :3] / spacing))

    # ------------------------------------------------------------------ writing back
    def writeProbabilityVolumes(self, volumeNode, probabilities, classNames):
        """Create or update one probability volume per class, named ``"<class> probability"``.

        Each has the source volume's geometry (origin, spacing, IJK-to-RAS directions) and parent
        transform, and references the source volume, so :meth:`rethreshold` finds it later.

        Parameters
        ----------
        volumeNode : vtkMRMLScalarVolumeNode
        probabilities : ndarray, shape (n_classes, z, y, x)
        classNames : sequence of str

        Returns
        -------
        list of vtkMRMLScalarVolumeNode
        """
        existing = self.probabilityVolumeNodes(volumeNode)
        for name, node in existing.items():
            if name not in classNames:  # a class was removed: its map would be stale
                self.scene.RemoveNode(node)
        ijkToRAS = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRAS)
        nodes = []
        for index, name in enumerate(classNames):
            node = existing.get(name)
            if node is None:
                node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{name}{PROBABILITY_SUFFIX}")
                node.SetAttribute(CLASS_NAME_ATTRIBUTE, name)
                node.SetNodeReferenceID(SOURCE_VOLUME_ROLE, volumeNode.GetID())
            node.SetAttribute(CLASS_INDEX_ATTRIBUTE, str(index))
            node.SetIJKToRASMatrix(ijkToRAS)
            node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
            slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(probabilities[index], np.float32))
            if node.GetDisplayNode() is None:
                node.CreateDefaultDisplayNodes()
                display = node.GetDisplayNode()
                display.SetAutoWindowLevel(False)
                display.SetWindowLevelMinMax(0.0, 1.0)
            nodes.append(node)
        return nodes

    def writeResultSegments(self, volumeNode, strokeSegmentationNode, outputSegmentationNode, classNames, masks,
                            editable=None):
        """Write masks on the volume's grid to ``"<class> (auto)"`` segments; no other segment is touched.

        Parameters
        ----------
        volumeNode : vtkMRMLScalarVolumeNode
            Defines the masks' voxel grid.
        strokeSegmentationNode : vtkMRMLSegmentationNode or None
            New result segments take the color of the class segment found here.
        outputSegmentationNode : vtkMRMLSegmentationNode
        classNames : sequence of str
        masks : sequence of ndarray of bool, shape (z, y, x)
        editable : ndarray of bool, optional
            Voxels outside it are left empty.

        Returns
        -------
        list of str
            Result segment IDs, in class order.
        """
        referenceRole = outputSegmentationNode.GetReferenceImageGeometryReferenceRole()
        if outputSegmentationNode.GetSegmentation().GetNumberOfSegments() == 0 and \
                outputSegmentationNode.GetNodeReference(referenceRole) is None:
            outputSegmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentation = outputSegmentationNode.GetSegmentation()
        wasModifying = outputSegmentationNode.StartModify()
        try:
            resultIds = []
            for name, mask in zip(classNames, masks):
                if editable is not None:
                    mask = mask & editable
                segmentName = f"{name}{AUTO_SUFFIX}"
                image = self.labelmapInSegmentationFrame(volumeNode, outputSegmentationNode, mask)
                segmentId = segmentation.GetSegmentIdBySegmentName(segmentName)
                if not segmentId:
                    # A new segment with its own labelmap gets its own layer: the layers holding
                    # the painted segments are not even touched.
                    segment = slicer.vtkSegment()
                    segment.SetName(segmentName)
                    segment.SetColor(self._classColor(strokeSegmentationNode, name) or _DEFAULT_COLOR)
                    segment.AddRepresentation(_BINARY_LABELMAP, image)
                    segmentation.AddSegment(segment)
                    segmentId = segmentation.GetSegmentIdBySegment(segment)
                else:
                    shared = []
                    segmentation.GetSegmentIDsSharingBinaryLabelmapRepresentation(segmentId, shared, False)
                    if shared:
                        segmentation.SeparateSegmentLabelmap(segmentId)  # never write into a layer of other segments
                    if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                            image, outputSegmentationNode, segmentId):
                        raise _lib().FetalAnnotateError(f"could not write segment {segmentName!r}")
                resultIds.append(segmentId)
        finally:
            outputSegmentationNode.EndModify(wasModifying)
        return resultIds

    @staticmethod
    def labelmapInSegmentationFrame(volumeNode, segmentationNode, array):
        """A uint8 labelmap (vtkOrientedImageData) of an array on the volume's grid, in the segmentation's frame.

        The parent transforms of both nodes are taken into account, so the labelmap can be given
        to the segmentation (or to a preview segmentation with the same parent transform).
        """
        image = _orientedImageFromArray(np.asarray(array).astype(np.uint8), _volumeGeometry(volumeNode))
        volumeToSegmentation = _transformBetween(volumeNode, segmentationNode)
        if volumeToSegmentation is not None:
            slicer.vtkOrientedImageDataResample.TransformOrientedImage(image, volumeToSegmentation)
        return image

    @staticmethod
    def _classColor(segmentationNode, className):
        """The painted class segment's color, so a result looks like its strokes."""
        if segmentationNode is None:
            return None
        segment = segmentationNode.GetSegmentation().GetSegment(
            segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(className))
        return segment.GetColor() if segment is not None else None


def classMasks(probabilities, strokes, classes, classNames, thresholds=None, labels=None):
    """One boolean mask per class from probabilities, strokes and optional per-class thresholds.

    Unthresholded classes: ``labels``, the engine's label map of that round
    (``SegmentationResult.labels``: graph-cut smoothed, painted voxels keep their class, islands
    without a stroke dropped); without it, the stroke-consistent labels of the probabilities
    alone (most probable class, no smoothing: that needs the image). A thresholded class: voxels
    with probability >= t plus its strokes, minus other classes' strokes, kept where connected to
    its strokes.
    """
    thresholds = dict(thresholds or {})
    unknown = sorted(set(thresholds) - set(classNames))
    if unknown:
        raise _lib().FetalAnnotateError(f"thresholds given for unknown classes {unknown}; "
                                        f"classes are {list(classNames)}")
    from FetalAnnotateLib.engine import stroke_consistent_labels

    if labels is None:
        labels = stroke_consistent_labels(probabilities, strokes, classes)
    masks = []
    for index, (value, name) in enumerate(zip(classes, classNames)):
        threshold = thresholds.get(name)
        if threshold is None:
            masks.append(labels == value)
            continue
        if not 0.0 <= float(threshold) <= 1.0:
            raise _lib().FetalAnnotateError(f"threshold of {name!r} must be in [0, 1], got {threshold}")
        mask = ((probabilities[index] >= threshold) | (strokes == value)) & ((strokes == 0) | (strokes == value))
        masks.append(_connectedTo(mask, strokes == value))
    return masks


def _lib():
    """FetalAnnotateLib, imported on first use (it needs scikit-learn, installed on demand in Slicer)."""
    import FetalAnnotateLib

    return FetalAnnotateLib


def _connectedTo(mask, seeds):
    """Voxels of ``mask`` in 26-connected components that contain a seed voxel."""
    from scipy import ndimage

    components, _ = ndimage.label(mask, np.ones((3, 3, 3), bool))
    kept = np.unique(components[seeds & mask])
    return np.isin(components, kept[kept > 0])


def _scaled(progress, start, stop):
    """A progress callback mapping [0, 1] onto [start, stop] of ``progress`` (None stays None)."""
    if progress is None:
        return None
    return lambda fraction, message: progress(start + (stop - start) * fraction, message)


def _volumeShape(volumeNode):
    """(z, y, x) array shape of a volume."""
    return tuple(reversed(volumeNode.GetImageData().GetDimensions()))


def _volumeSpacing(volumeNode):
    """(z, y, x) spacing of a volume in mm."""
    return tuple(float(s) for s in reversed(volumeNode.GetSpacing()))


def _checkSameGrid(volumeNode, featureNode):
    """Raise FetalAnnotateError unless ``featureNode`` is a feature volume on ``volumeNode``'s voxel grid.

    Same dimensions, IJK-to-RAS matrix (spacing, origin, axis directions; within
    :data:`_GRID_TOLERANCE` of the smallest spacing) and parent transform: then voxel (k, j, i) of
    both is the same point, so the feature maps are used as they are, without resampling.
    """
    name = volumeNode.GetName()
    advice = f"export the features from {name!r} itself (e.g. FetalInpaint > Export features with it as input)"
    # vtkMRMLVectorVolumeNode derives from vtkMRMLTensorVolumeNode: exclude only diffusion tensors (3x3 per voxel).
    if featureNode is None or not featureNode.IsA("vtkMRMLScalarVolumeNode") or \
            featureNode.IsA("vtkMRMLDiffusionTensorVolumeNode"):
        kind = "nothing" if featureNode is None else f"{featureNode.GetName()!r} ({featureNode.GetClassName()})"
        raise _lib().FetalAnnotateError(f"extra features must be scalar or vector volumes, got {kind}")
    featureName = featureNode.GetName()
    imageData = featureNode.GetImageData()
    if imageData is None or imageData.GetNumberOfPoints() == 0:
        raise _lib().FetalAnnotateError(f"feature volume {featureName!r} has no voxels; {advice}")
    if imageData.GetDimensions() != volumeNode.GetImageData().GetDimensions():
        raise _lib().FetalAnnotateError(
            f"feature volume {featureName!r} has {imageData.GetDimensions()} voxels (i, j, k), source volume "
            f"{name!r} has {volumeNode.GetImageData().GetDimensions()}; {advice}")
    featureMatrix, sourceMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    featureNode.GetIJKToRASMatrix(featureMatrix)
    volumeNode.GetIJKToRASMatrix(sourceMatrix)
    tolerance = _GRID_TOLERANCE * min(volumeNode.GetSpacing())
    if not np.allclose(slicer.util.arrayFromVTKMatrix(featureMatrix), slicer.util.arrayFromVTKMatrix(sourceMatrix),
                       rtol=0.0, atol=tolerance):
        raise _lib().FetalAnnotateError(
            f"feature volume {featureName!r} has another spacing, origin or axis directions than source volume "
            f"{name!r} (features are not resampled); {advice}")
    if featureNode.GetTransformNodeID() != volumeNode.GetTransformNodeID():
        raise _lib().FetalAnnotateError(
            f"feature volume {featureName!r} is under another parent transform than source volume {name!r}; "
            f"put both under the same transform, or {advice}")


def _volumeGeometry(volumeNode):
    """A vtkOrientedImageData with the volume's extent and IJK-to-RAS matrix (no voxels allocated)."""
    geometry = slicer.vtkOrientedImageData()
    geometry.SetExtent(volumeNode.GetImageData().GetExtent())
    ijkToRAS = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRAS)
    geometry.SetImageToWorldMatrix(ijkToRAS)
    return geometry


def _orientedImageFromArray(array, geometry):
    """A uint8 vtkOrientedImageData with ``geometry``'s extent and matrix holding ``array`` (z, y, x)."""
    image = slicer.vtkOrientedImageData()
    image.SetExtent(geometry.GetExtent())
    matrix = vtk.vtkMatrix4x4()
    geometry.GetImageToWorldMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = np.ascontiguousarray(array, np.uint8).ravel()
    return image


def _orientedImageArray(image):
    """Voxels of a single-component vtkImageData as a (z, y, x) array (a copy)."""
    shape = tuple(reversed(image.GetDimensions()))
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape).copy()


def _transformBetween(sourceNode, targetNode):
    """Transform from ``sourceNode``'s coordinate frame to ``targetNode``'s, or None when they share a frame."""
    sourceParent, targetParent = sourceNode.GetParentTransformNode(), targetNode.GetParentTransformNode()
    if sourceParent is targetParent:
        return None
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(sourceParent, targetParent, transform)
    return transform
