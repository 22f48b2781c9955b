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
one probability volume per class, in the source volume's geometry. A result segment edited by hand
since it was written is never overwritten: it is kept as ``"<class> (edited)"`` (see
:meth:`FetalAnnotateLogic.writeResultSegments`).

Image features are computed once per volume and shared by every ``FetalAnnotateLogic`` of a scene
(:class:`SessionCache`, found with :func:`sessionCacheOf`), e.g. by the module panel and the Segment
Editor effect; they are freed when the volume is removed from the scene or the scene is closed.

``FetalAnnotateLogic`` is a plain class, not a ``ScriptedLoadableModuleLogic``: that base lives in
``slicer/ScriptedLoadableModule.py``, which imports ``qt`` and ``ctk`` (absent in pip's slicer-core,
so the logic could not run headless in tests and batch jobs), and its ``getParameterNode()`` uses the
global ``slicer.mrmlScene`` instead of the logic's scene. The module's parameter node belongs to the
Qt layer (``FetalAnnotate.getParameterNode()``); the logic takes its settings as arguments.

FetalAnnotateLib (which needs scikit-learn) is imported on first use, not when this module is
imported, so Slicer can load the module and offer to install scikit-learn before it is needed.
Errors are ``FetalAnnotateLib.FetalAnnotateError`` subclasses with a message that says what to do.
"""

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

AUTO_SUFFIX = " (auto)"
#: Name suffix of a result segment edited by hand, kept when a new result is written.
EDITED_SUFFIX = " (edited)"
PROBABILITY_SUFFIX = " probability"
#: Segment tags (saved with the segmentation): RESULT_TAG is "auto" on a result segment as written,
#: "edited" on one kept after a hand edit; FINGERPRINT_TAG holds a digest of the voxels written.
RESULT_TAG = "FetalAnnotate.Result"
FINGERPRINT_TAG = "FetalAnnotate.ResultFingerprint"
#: Attributes and reference role that tie a probability volume to its class and source volume.
CLASS_NAME_ATTRIBUTE = "FetalAnnotate.ClassName"
CLASS_INDEX_ATTRIBUTE = "FetalAnnotate.ClassIndex"
#: A digest of the strokes a probability volume was trained on (saved with the scene), so that a
#: new session can take up that result when the strokes are the same (a scene opened again).
STROKES_ATTRIBUTE = "FetalAnnotate.StrokesFingerprint"
SOURCE_VOLUME_ROLE = "FetalAnnotateSourceVolume"
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
    tookUpWrittenResult : bool
        Whether the round went on from the probability volumes in the scene (a scene opened
        again; :meth:`FetalAnnotateLogic.session`) instead of starting afresh.
    """

    classNames: tuple
    resultSegmentIds: tuple
    probabilityVolumeNodes: tuple
    outputSegmentationNode: object
    tookUpWrittenResult: bool = False


class _VolumeSession:
    """An AnnotationSession with what it was built from, so it is rebuilt only when those change."""

    def __init__(self, session, key, resumable):
        self.session = session
        self.key = key
        self.classNames = None
        # Whether the first round may take up the probability volumes in the scene: not when the
        # session replaced one with other settings, whose result it would hold on to.
        self.resumable = resumable
        self.tookUpWrittenResult = False  # the last round did


class SessionCache:
    """The AnnotationSessions of one scene's volumes, shared by every FetalAnnotateLogic of that scene.

    A session holds a volume's image features (tens of times the volume's memory), so they are
    computed once per volume and scene, whether the module panel or the Segment Editor effect asks
    first. Get the cache of a scene with :func:`sessionCacheOf`; every :class:`FetalAnnotateLogic`
    does (``logic.sessionCache``). It observes the scene: a volume's session is freed when the
    volume node is removed from the scene (``vtkMRMLScene::NodeRemovedEvent``), all sessions when
    the scene is closed (``vtkMRMLScene::EndCloseEvent``, also fired by ``scene.Clear()``).
    """

    def __init__(self, scene):
        self._sessions = {}  # volume node ID -> _VolumeSession
        self._writtenResults = {}  # (segmentation node ID, segment ID) -> (shape, packed voxels) as last written
        # The observers hold this cache, not the other way round: the cache lives as long as the scene.
        scene.AddObserver(slicer.vtkMRMLScene.NodeRemovedEvent, self._onNodeRemoved)
        scene.AddObserver(slicer.vtkMRMLScene.EndCloseEvent, self._onSceneClosed)

    def get(self, volumeNodeId):
        """The cached ``_VolumeSession`` of a volume node ID, or None."""
        return self._sessions.get(volumeNodeId)

    def put(self, volumeNodeId, volumeSession):
        """Cache ``volumeSession`` for a volume node ID, replacing any previous one."""
        self._sessions[volumeNodeId] = volumeSession

    def release(self, volumeNodeId):
        """Forget a volume's session (frees its features)."""
        self._sessions.pop(volumeNodeId, None)

    def clear(self):
        """Forget every session."""
        self._sessions.clear()

    def volumeNodeIds(self):
        """IDs of the volume nodes that have a cached session."""
        return list(self._sessions)

    def rememberWrittenResult(self, segmentationNodeId, segmentId, voxels):
        """Keep the voxels (boolean array on the volume's grid) last written to a result segment."""
        self._writtenResults[(segmentationNodeId, segmentId)] = (voxels.shape, np.packbits(voxels))

    def writtenResult(self, segmentationNodeId, segmentId):
        """The voxels last written to a result segment in this scene, or None when not known here."""
        written = self._writtenResults.get((segmentationNodeId, segmentId))
        if written is None:
            return None
        shape, packed = written
        return np.unpackbits(packed, count=int(np.prod(shape))).reshape(shape).astype(bool)

    def _onNodeRemoved(self, scene, event, node):
        self.release(node.GetID())
        for key in [key for key in self._writtenResults if key[0] == node.GetID()]:
            del self._writtenResults[key]

    _onNodeRemoved.CallDataType = vtk.VTK_OBJECT  # the removed node comes as call data

    def _onSceneClosed(self, scene, event):
        self.clear()  # node IDs are reused after a close: no session may outlive it
        self._writtenResults.clear()


_SESSION_CACHES = {}  # scene address -> SessionCache; an entry leaves when its scene is deleted


def sessionCacheOf(scene):
    """The :class:`SessionCache` of ``scene``, created on first use; the same object for every caller.

    Parameters
    ----------
    scene : vtkMRMLScene

    Returns
    -------
    SessionCache
    """
    key = scene.__this__  # the C++ object's address: stable while the scene exists, whatever Python wraps it
    cache = _SESSION_CACHES.get(key)
    if cache is None:
        cache = SessionCache(scene)
        _SESSION_CACHES[key] = cache
        scene.AddObserver(vtk.vtkCommand.DeleteEvent, lambda caller, event: _SESSION_CACHES.pop(key, None))
    return cache


class FetalAnnotateLogic:
    """Train a random forest on painted segments and write the segmentation back to the scene.

    One :class:`FetalAnnotateLib.AnnotationSession` is kept per source volume, so image features
    are computed once and reused across rounds; it is rebuilt when the volume's voxels, spacing,
    feature preset, forest settings or extra feature volumes (which ones, or their voxels) change.
    The sessions are the scene's (:class:`SessionCache`): every logic of a scene shares them.

    Parameters
    ----------
    scene : vtkMRMLScene, optional
        Scene of the nodes; ``slicer.mrmlScene`` when omitted.

    Attributes
    ----------
    scene : vtkMRMLScene
    sessionCache : SessionCache
        The scene's sessions, ``sessionCacheOf(scene)``.
    """

    def __init__(self, scene=None):
        self.scene = scene if scene is not None else slicer.mrmlScene
        self.sessionCache = sessionCacheOf(self.scene)

    # ------------------------------------------------------------------ reading strokes
    @staticmethod
    def classSegmentIds(segmentationNode):
        """IDs of the segments that are classes: every segment but the result segments, in table order.

        See :meth:`isResultSegment`.
        """
        _checkSegmentation(segmentationNode)
        return [segmentId for segmentId in _segmentIds(segmentationNode)
                if not FetalAnnotateLogic.isResultSegment(segmentationNode, segmentId)]

    @staticmethod
    def isResultSegment(segmentationNode, segmentId):
        """True for a result segment, which is never a class (nor restricts the editable area).

        Result segments are those named ``"<class> (auto)"`` and those tagged as written by
        :meth:`writeResultSegments`, including hand-edited results it kept as ``"<class> (edited)"``.
        """
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        return segment.HasTag(RESULT_TAG) or segment.GetName().endswith(AUTO_SUFFIX)

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
        _checkSourceVolume(volumeNode)
        _checkSegmentation(segmentationNode)
        segmentIds = list(segmentIds) if segmentIds is not None else self.classSegmentIds(segmentationNode)
        if len(segmentIds) > 255:
            raise _lib().StrokeError("at most 255 class segments are supported")
        labels = np.zeros(_volumeShape(volumeNode), np.uint8)
        for value in range(len(segmentIds), 0, -1):
            labels[self.segmentArray(volumeNode, segmentationNode, segmentIds[value - 1])] = value
        segmentation = segmentationNode.GetSegmentation()
        return labels, [segmentation.GetSegment(segmentId).GetName() for segmentId in segmentIds]

    def editableArea(self, volumeNode, segmentationNode, masking, classSegmentIds=None):
        """Boolean array (z, y, x) of the voxels results may be written to, or None for everywhere.

        The editable-area modes are those of the Segment Editor, with one difference: results of
        all classes are written at once, so in the inside/outside all/visible segments modes the
        class segments and the result segments (:meth:`isResultSegment`) do not count; only the
        other segments, e.g. a region of interest, define the area. (The editor exempts just the
        segment being edited, so the previous round's results, which cover the volume, would
        leave nothing editable.)

        Parameters
        ----------
        volumeNode : vtkMRMLScalarVolumeNode
            Defines the voxel grid of the returned array.
        segmentationNode : vtkMRMLSegmentationNode
            Holds the segments the area is defined by.
        masking : Masking
            Editable area and intensity range, e.g. ``Masking.fromSegmentEditorNode(editorNode)``.
        classSegmentIds : sequence of str, optional
            The class segments of this round; :meth:`classSegmentIds` when omitted.

        Raises
        ------
        FetalAnnotateError
            The mode needs segments that are not there (no mask segment, or inside all/visible
            segments with none but classes and results).
        """
        if masking is None:
            return None
        editable = None
        if masking.maskMode != slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere:
            inside = masking.maskMode in (slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment,
                                          slicer.vtkMRMLSegmentationNode.EditAllowedInsideAllSegments,
                                          slicer.vtkMRMLSegmentationNode.EditAllowedInsideVisibleSegments)
            areaIds = self._maskSegmentIds(segmentationNode, masking, classSegmentIds)
            if inside and not areaIds:
                raise _lib().FetalAnnotateError(
                    "the editable area is inside segments, but there is no segment to define it besides the "
                    "classes and the results; paint one where results may go, or change the editable area")
            area = np.zeros(_volumeShape(volumeNode), bool)
            for segmentId in areaIds:
                area |= self.segmentArray(volumeNode, segmentationNode, segmentId)
            editable = area if inside else ~area
        if masking.intensityRange is not None:
            low, high = masking.intensityRange
            image = slicer.util.arrayFromVolume(volumeNode)
            inRange = (image >= low) & (image <= high)
            editable = inRange if editable is None else editable & inRange
        return editable

    def _maskSegmentIds(self, segmentationNode, masking, classSegmentIds):
        """The segments whose union is the inside of a (non-"everywhere") editable area.

        As in ``vtkMRMLSegmentationNode::GenerateEditMask`` (the one chosen segment, all segments,
        or the visible ones), minus the class and result segments except a chosen mask segment.
        """
        modes = slicer.vtkMRMLSegmentationNode
        if masking.maskMode == modes.EditAllowedInsideSingleSegment:
            if not masking.maskSegmentId:
                raise _lib().FetalAnnotateError("the editable area is inside a single segment, but none is chosen; "
                                                "choose the mask segment in the Segment Editor")
            if segmentationNode.GetSegmentation().GetSegment(masking.maskSegmentId) is None:
                raise _lib().FetalAnnotateError(
                    f"the mask segment {masking.maskSegmentId!r} is not in segmentation "
                    f"{segmentationNode.GetName()!r}; choose it again in the Segment Editor")
            return [masking.maskSegmentId]
        segmentIds = _segmentIds(segmentationNode)
        if masking.maskMode in (modes.EditAllowedInsideVisibleSegments, modes.EditAllowedOutsideVisibleSegments):
            displayNode = segmentationNode.GetDisplayNode()
            if displayNode is None:
                raise _lib().FetalAnnotateError(f"segmentation {segmentationNode.GetName()!r} is not displayed, so "
                                                "no segment is visible; show it, or change the editable area")
            segmentIds = [segmentId for segmentId in segmentIds if displayNode.GetSegmentVisibility(segmentId)]
        classes = set(self.classSegmentIds(segmentationNode) if classSegmentIds is None else classSegmentIds)
        return [segmentId for segmentId in segmentIds
                if segmentId not in classes and not self.isResultSegment(segmentationNode, segmentId)]

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
            Share of the previous round's probabilities in a round with the same classes, away
            from the strokes painted, painted over or erased since
            (``AnnotationSession(memory=...)``: it fades in over
            ``FetalAnnotateLib.MEMORY_REACH_MM`` of geodesic distance from them; 0: each round
            starts afresh; a single-slice volume is never blended); ``FetalAnnotateLib.MEMORY``
            when omitted. A setting of each call, not cached.
        """
        key = self._sessionKey(volumeNode, preset, forestSettings, extraFeatureNodes)
        cached = self.sessionCache.get(volumeNode.GetID())
        if cached is None or cached.key != key:
            resumable = cached is None
            self.sessionCache.release(volumeNode.GetID())  # free the old features before computing new ones
            session = _lib().AnnotationSession(_volumeVoxels(volumeNode),
                                               _volumeSpacing(volumeNode), preset=preset,
                                               extra_features=self.extraFeatureArray(volumeNode, extraFeatureNodes),
                                               forest=forestSettings, progress=progress)
            cached = _VolumeSession(session, key, resumable)
            self.sessionCache.put(volumeNode.GetID(), cached)
        cached.session.progress = progress
        cached.session.enclosure_margin_mm = _lib().OUTLINE_MARGIN_MM if outlineMode else None
        cached.session.smoothness = _lib().SMOOTHNESS if smoothness is None else float(smoothness)
        cached.session.memory = _lib().MEMORY if memory is None else memory  # the setter converts and checks
        return cached.session

    def hasSession(self, volumeNode, preset="default", forestSettings=None, extraFeatureNodes=None):
        """True when the features of ``volumeNode`` for these settings are already computed."""
        cached = self.sessionCache.get(volumeNode.GetID())
        return cached is not None and cached.key == self._sessionKey(volumeNode, preset, forestSettings,
                                                                     extraFeatureNodes)

    @staticmethod
    def _sessionKey(volumeNode, preset, forestSettings, extraFeatureNodes):
        """What a cached session depends on: voxels, spacing, preset, forest settings and extra feature volumes.

        Checks the extra feature volumes' grids on every call (cheap: no voxels are read), so a
        volume moved after its features were computed is refused even when the session is cached.
        """
        _checkSourceVolume(volumeNode)
        extraKey = []
        for featureNode in extraFeatureNodes or ():
            _checkSameGrid(volumeNode, featureNode)
            extraKey.append((featureNode.GetID(), featureNode.GetImageData().GetMTime()))
        return (volumeNode.GetImageData().GetMTime(), volumeNode.GetSpacing(), preset,
                repr(sorted((forestSettings or {}).items())), tuple(extraKey))

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
        """Forget the cached features of a volume (frees memory; also done when the volume leaves the scene)."""
        self.sessionCache.release(volumeNode.GetID())

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
        _checkSourceVolume(volumeNode)
        _checkSegmentation(segmentationNode)
        segmentIds = list(segmentIds) if segmentIds is not None else self.classSegmentIds(segmentationNode)
        strokes, classNames = self.strokeLabels(volumeNode, segmentationNode, segmentIds)
        result, classNames = self.train(volumeNode, strokes, classNames, progress=progress, preset=preset,
                                        forestSettings=forestSettings, extraFeatureNodes=extraFeatureNodes,
                                        outlineMode=outlineMode, smoothness=smoothness, memory=memory)
        tookUp = self.sessionCache.get(volumeNode.GetID()).tookUpWrittenResult
        probabilityNodes = self.writeProbabilityVolumes(volumeNode, result.probabilities, classNames,
                                                        strokes=strokes, classes=result.classes)
        outputSegmentationNode = outputSegmentationNode or segmentationNode
        masks = classMasks(result.probabilities, strokes, result.classes, classNames, thresholds, result.labels)
        editable = self.editableArea(volumeNode, segmentationNode, masking, segmentIds)
        resultIds = self.writeResultSegments(volumeNode, segmentationNode, outputSegmentationNode, classNames, masks,
                                              editable)
        return SegmentResult(tuple(classNames), tuple(resultIds), tuple(probabilityNodes), outputSegmentationNode,
                             tookUp)

    def train(self, volumeNode, strokes, classNames, *, progress=None, preset="default", forestSettings=None,
              extraFeatureNodes=None, outlineMode=False, smoothness=None, memory=None):
        """One round on a stroke label array: train, predict, and remember the class names for
        :meth:`saveClassifier`. Writes nothing to the scene (:meth:`segment` does).

        Parameters
        ----------
        volumeNode : vtkMRMLScalarVolumeNode
        strokes : ndarray of uint8, shape (z, y, x)
            0 unpainted, k for ``classNames[k - 1]`` (as :meth:`strokeLabels` gives).
        classNames : sequence of str
            Distinct names; at least two of the classes painted.
        progress, preset, forestSettings, extraFeatureNodes, outlineMode, smoothness, memory
            As for :meth:`session`; ``progress`` also covers computing the features in the first round.

        Returns
        -------
        result : FetalAnnotateLib.SegmentationResult
            The round's probabilities and labels (``result.classes``: the painted label values).
        classNames : list of str
            The names of ``result.classes``, in their order.
        """
        classNames = list(classNames)
        paintedValues = [value for value in range(1, len(classNames) + 1) if (strokes == value).any()]
        painted = [classNames[value - 1] for value in paintedValues]
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
        cached = self.sessionCache.get(volumeNode.GetID())
        cached.tookUpWrittenResult = (cached.classNames is None and cached.resumable
                                      and self._takeUpWrittenResult(volumeNode, session, strokes, paintedValues,
                                                                    painted))
        result = session.update(strokes)
        cached = self.sessionCache.get(volumeNode.GetID())
        if cached is None or cached.session is not session:  # the progress callback let the user close the scene
            raise _lib().OperationCancelled(f"volume {volumeNode.GetName()!r} was removed (or the scene closed) "
                                            "during training")
        classNames = [classNames[value - 1] for value in result.classes]
        cached.classNames = tuple(classNames)
        return result, classNames

    def _takeUpWrittenResult(self, volumeNode, session, strokes, classes, painted):
        """Let a new session build on the probability volumes in the scene when they were trained
        on these strokes (``AnnotationSession.resume``): a scene opened again goes on from its last
        result instead of starting afresh, which does worse than the session that drew the
        strokes (docs/engine.md). ``classes``: the painted values of ``strokes``, ``painted``
        their names. Returns whether it did."""
        nodes = self.probabilityVolumeNodes(volumeNode)
        fingerprint = _strokesFingerprint(strokes, classes, painted)
        if (sorted(nodes) != sorted(painted)
                or any(node.GetAttribute(STROKES_ATTRIBUTE) != fingerprint or not _sameGrid(volumeNode, node)
                       for node in nodes.values())):
            return False
        try:
            session.resume(strokes, np.stack([slicer.util.arrayFromVolume(nodes[name]) for name in painted]))
        except _lib().FetalAnnotateError as error:  # edited by hand since: start afresh
            logging.info(f"FetalAnnotate: not taking up the probability volumes of {volumeNode.GetName()!r}: {error}")
            return False
        return True

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
        _checkSourceVolume(volumeNode)
        nodes = self.probabilityVolumeNodes(volumeNode)
        if not nodes:
            raise _lib().FetalAnnotateError(f"no probability volumes of {volumeNode.GetName()!r} in the scene; "
                                     "train first ('Train and segment')")
        if not all(_sameGrid(volumeNode, node) for node in nodes.values()):
            raise _lib().FetalAnnotateError(f"the voxel grid of volume {volumeNode.GetName()!r} changed since "
                                            "training (e.g. cropped or resampled); train again ('Train and segment')")
        classNames = list(nodes)
        probabilities = np.stack([slicer.util.arrayFromVolume(node) for node in nodes.values()]).astype(np.float32)
        segmentIds = self.classSegmentIds(segmentationNode)
        strokes, strokeNames = self.strokeLabels(volumeNode, segmentationNode, segmentIds)
        # Strokes are matched to probability maps by class name, so renamed or added segments cannot mislabel.
        classStrokes = np.zeros(strokes.shape, np.uint8)
        for value, name in enumerate(strokeNames, start=1):
            if name in classNames:
                classStrokes[strokes == value] = classNames.index(name) + 1
        # As in segment(): segments that were not trained (e.g. a region of interest) define the editable area.
        trainedSegmentIds = [segmentId for segmentId, name in zip(segmentIds, strokeNames) if name in classNames]
        classes = tuple(range(1, len(classNames) + 1))
        masks = classMasks(probabilities, classStrokes, classes, classNames, thresholds)
        outputSegmentationNode = outputSegmentationNode or segmentationNode
        editable = self.editableArea(volumeNode, segmentationNode, masking, trainedSegmentIds)
        resultIds = self.writeResultSegments(volumeNode, segmentationNode, outputSegmentationNode, classNames, masks,
                                              editable)
        return SegmentResult(tuple(classNames), tuple(resultIds), tuple(nodes.values()), outputSegmentationNode)

    def probabilityVolumeNodes(self, volumeNode):
        """``{class name: probability volume node}`` of a source volume, in class order."""
        found = []
        # Not GetNodesByClass(className): the caller must UnRegister the collection it returns, and
        # slicer.util.getNodesByClass (which does) reads slicer.mrmlScene, not this scene.
        for index in range(self.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
            node = self.scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
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
        cached = self.sessionCache.get(volumeNode.GetID())
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
        probabilities = saved.classifier.predict_proba(_volumeVoxels(volumeNode),
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

    @staticmethod
    def applyClassifierToFiles(classifierPath, inputs, outputFolder, *, overwrite=False, extraFeatures=None,
                               progress=None):
        """Segment volume files with a saved classifier, one after the other in this process.

        The same batch as ``fetalannotate apply`` and
        :func:`FetalAnnotateLib.batch.apply_classifier_to_files` (see it for the inputs, the
        outputs and the volumetry report): nothing is loaded into the scene, existing outputs are
        kept unless ``overwrite``, and a volume that fails is reported without stopping the others.
        For worker processes, run the command line outside Slicer.

        Parameters
        ----------
        classifierPath : str or Path
            A ``.skops`` file written by :meth:`saveClassifier`.
        inputs : str, Path or sequence of them
            Volume files, DICOM series folders, or folders of them.
        outputFolder : str or Path
            Where the ``.seg.nrrd`` files and the report go.
        overwrite : bool
            Segment volumes whose output exists again; only outputs unchanged since the batch
            wrote them are replaced (a corrected one is kept and its volume fails with a message).
        extraFeatures : str, optional
            For a classifier trained with extra feature channels: each volume's feature file,
            with ``{name}`` for the volume's name, e.g. ``"features/{name}_features.nrrd"``.
        progress : callable, optional
            ``progress(fraction, message) -> bool``; True stops the batch (the volume being segmented
            is dropped; finished ones are kept). When
            omitted, in the Slicer application a progress dialog with a Cancel button shows the
            progress (and the status bar the current volume); headless, nothing is shown.

        Returns
        -------
        FetalAnnotateLib.batch.BatchResult
            Also when cancelled: then it lists the volumes done before the stop (their outputs
            and the report are kept).
        """
        import logging

        from FetalAnnotateLib.batch import BatchCancelled, apply_classifier_to_files

        dialog = None
        if progress is None and getattr(slicer, "app", None) is not None and slicer.util.mainWindow() is not None:
            dialog = slicer.util.createProgressDialog(windowTitle="Segmenting files", labelText="Starting")

            def progress(fraction, message):
                dialog.value = int(100 * fraction)
                dialog.labelText = message
                slicer.util.showStatusMessage(f"Segmenting files: {message}")
                slicer.app.processEvents()
                return dialog.wasCanceled

        try:
            return apply_classifier_to_files(classifierPath, inputs, outputFolder, overwrite=overwrite, jobs=1,
                                             extra_features=extraFeatures, progress=progress, log=logging.info)
        except BatchCancelled as cancelled:
            logging.info(str(cancelled))
            return cancelled.result
        finally:
            if dialog is not None:
                dialog.close()

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
    def writeProbabilityVolumes(self, volumeNode, probabilities, classNames, strokes=None, classes=None):
        """Create or update one probability volume per class, named ``"<class> probability"``.

        Each has the source volume's geometry (origin, spacing, IJK-to-RAS directions) and parent
        transform, and references the source volume, so :meth:`rethreshold` finds it later.

        Parameters
        ----------
        volumeNode : vtkMRMLScalarVolumeNode
        probabilities : ndarray, shape (n_classes, z, y, x)
        classNames : sequence of str
        strokes, classes : ndarray of int and sequence of int, optional
            The strokes the probabilities were trained on and their class values, in the order of
            ``classNames``: a digest of them is kept with the volumes, so that a new session (a
            scene opened again) takes up this result when the strokes are the same. Omitted
            (probabilities from a saved classifier), no session takes it up.

        Returns
        -------
        list of vtkMRMLScalarVolumeNode
        """
        fingerprint = None if strokes is None else _strokesFingerprint(strokes, classes, classNames)
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
            if fingerprint is None:
                node.RemoveAttribute(STROKES_ATTRIBUTE)
            else:
                node.SetAttribute(STROKES_ATTRIBUTE, fingerprint)
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
        """Write masks on the volume's grid to ``"<class> (auto)"`` segments, keeping hand edits.

        Each result segment is tagged with a digest of the voxels written (segment tags are saved
        with the scene). Before writing, every ``"(auto)"`` segment is checked against it:

        - edited since it was written (or not matching a digest on this volume's grid: named so by
          hand, or written for another volume; voxels that class strokes painted over it took out,
          as the Segment Editor's default "overwrite all segments" mode does, are no edit while the
          scene's cache holds what was written, i.e. until the scene is closed): kept, renamed
          ``"<class> (edited)"`` (``"(edited 2)"``, ... if taken) and tagged as an edited result, so
          it is neither a class nor overwritten; the new result goes to a new ``"<class> (auto)"``;
        - unedited, of a class in ``classNames``: overwritten with the new result;
        - unedited, of a class not in ``classNames`` (removed or renamed class): removed, as its
          probability volume is.

        No other segment is touched.

        Parameters
        ----------
        volumeNode : vtkMRMLScalarVolumeNode
            Defines the masks' voxel grid.
        strokeSegmentationNode : vtkMRMLSegmentationNode or None
            New result segments take the color of the class segment found here; without one, the
            output's display node gives each a distinct color.
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
            self._setAsideEditedResults(volumeNode, outputSegmentationNode, classNames)
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
                    color = self._classColor(strokeSegmentationNode, name)
                    if color is not None:  # else the segmentation's display node gives it a color of its own
                        segment.SetColor(color)
                    segment.SetTag(RESULT_TAG, "auto")
                    binaryLabelmap = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
                    segment.AddRepresentation(binaryLabelmap, image)
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
                # What reading the segment back gives, so a later check compares like with like.
                written = self.segmentArray(volumeNode, outputSegmentationNode, segmentId)
                segmentation.GetSegment(segmentId).SetTag(FINGERPRINT_TAG, _fingerprint(written))
                self.sessionCache.rememberWrittenResult(outputSegmentationNode.GetID(), segmentId, written)
                resultIds.append(segmentId)
        finally:
            outputSegmentationNode.EndModify(wasModifying)
        return resultIds

    def _setAsideEditedResults(self, volumeNode, segmentationNode, classNames):
        """Rename edited ``"(auto)"`` segments ``"<class> (edited)"``; remove unedited ones of other classes.

        See :meth:`writeResultSegments`.
        """
        segmentation = segmentationNode.GetSegmentation()
        strokes = None
        for segmentId in _segmentIds(segmentationNode):
            segment = segmentation.GetSegment(segmentId)
            if not segment.GetName().endswith(AUTO_SUFFIX):
                continue
            className = segment.GetName()[:-len(AUTO_SUFFIX)]
            voxels = self.segmentArray(volumeNode, segmentationNode, segmentId)
            written = self.sessionCache.writtenResult(segmentationNode.GetID(), segmentId)
            digest = vtk.reference("")
            # The digest first: Undo restores a segment's earlier voxels together with their digest.
            unedited = bool(segment.GetTag(FINGERPRINT_TAG, digest)) and str(digest) == _fingerprint(voxels)
            if not unedited and written is not None and written.shape == voxels.shape:
                # Painting a class stroke in the Segment Editor's default "overwrite all" mode takes
                # its voxels out of the results: that is a correction stroke, not an edit of the result.
                changed = voxels != written
                if changed.any() and strokes is None:
                    strokes = self.strokeLabels(volumeNode, segmentationNode)[0] > 0
                unedited = not (changed.any() and (changed & ~strokes).any())
            if not unedited:
                segment.SetName(_unusedSegmentName(segmentation, f"{className}{EDITED_SUFFIX}"))
                segment.SetTag(RESULT_TAG, "edited")
                segment.RemoveTag(FINGERPRINT_TAG)
            elif className not in classNames:
                segmentation.RemoveSegment(segmentId)

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
    farther than 3 mm from a stroke of their class dropped); without it, the stroke-consistent
    labels of the probabilities alone (most probable class, no smoothing: that needs the image;
    islands not touching a stroke dropped). A thresholded class: voxels with probability >= t
    plus its strokes, minus other classes' strokes, kept where connected to its strokes.
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


def _checkSourceVolume(volumeNode):
    """Raise FetalAnnotateError unless ``volumeNode`` is a scalar volume with voxels and a usable spacing."""
    imageData = volumeNode.GetImageData() if volumeNode is not None else None
    if imageData is None or imageData.GetNumberOfPoints() == 0:
        raise _lib().FetalAnnotateError("select a source volume that has voxels")
    name = volumeNode.GetName()
    if imageData.GetNumberOfScalarComponents() != 1:
        raise _lib().FetalAnnotateError(f"volume {name!r} has several components per voxel; "
                                        "convert it to a scalar volume (e.g. with Vector to Scalar Volume)")
    spacing = volumeNode.GetSpacing()
    if not all(np.isfinite(value) and value > 0 for value in spacing):
        raise _lib().FetalAnnotateError(
            f"volume {name!r} has voxel spacing {tuple(spacing)} mm; every spacing must be a positive number: "
            "correct it in Volumes > Volume Information (Image Spacing)")


def _checkSegmentation(segmentationNode):
    """Raise FetalAnnotateError unless ``segmentationNode`` is a segmentation node."""
    if segmentationNode is None or not segmentationNode.IsA("vtkMRMLSegmentationNode"):
        raise _lib().FetalAnnotateError("select a segmentation that holds the painted class segments")


def _fingerprint(voxels):
    """Digest of a boolean array on a volume's grid (with the grid's shape)."""
    digest = hashlib.sha256(np.asarray(voxels.shape, np.int64).tobytes())
    digest.update(np.packbits(voxels).tobytes())
    return digest.hexdigest()


def _strokesFingerprint(strokes, classes, classNames):
    """Digest of stroke labels on a volume's grid by class name (``classNames[k]`` is the name of
    value ``classes[k]``): which class each voxel holds, whatever the segments' order."""
    names = sorted(classNames)
    ranks = np.zeros(strokes.shape, np.uint8)
    for value, name in zip(classes, classNames):
        ranks[strokes == value] = names.index(name) + 1
    digest = hashlib.sha256("\n".join(names).encode())
    digest.update(np.asarray(ranks.shape, np.int64).tobytes())
    digest.update(ranks.tobytes())
    return digest.hexdigest()


def _segmentIds(segmentationNode):
    """IDs of all segments of a segmentation node, in table order."""
    segmentation = segmentationNode.GetSegmentation()
    return [segmentation.GetNthSegmentID(index) for index in range(segmentation.GetNumberOfSegments())]


def _unusedSegmentName(segmentation, name):
    """``name``, or ``name`` with " 2", " 3", ... before its closing parenthesis if a segment has it."""
    candidate, number = name, 1
    while segmentation.GetSegmentIdBySegmentName(candidate):
        number += 1
        candidate = f"{name[:-1]} {number})"
    return candidate


def _volumeVoxels(volumeNode):
    """A copy of a volume's voxels (z, y, x) in their own type.

    A copy, because a long computation processes events (Cancel), and the node may change or be
    removed meanwhile; in their own type, because float32 would turn a double volume's large
    finite values into infinities (the engine normalises any real type itself).
    """
    return slicer.util.arrayFromVolume(volumeNode).copy()


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
    if not _sameGrid(volumeNode, featureNode):
        raise _lib().FetalAnnotateError(
            f"feature volume {featureName!r} has another spacing, origin or axis directions than source volume "
            f"{name!r} (features are not resampled); {advice}")
    if featureNode.GetTransformNodeID() != volumeNode.GetTransformNodeID():
        raise _lib().FetalAnnotateError(
            f"feature volume {featureName!r} is under another parent transform than source volume {name!r}; "
            f"put both under the same transform, or {advice}")


def _sameGrid(volumeNode, otherNode):
    """True when two volumes with voxels have the same dimensions and IJK-to-RAS matrix.

    The matrices (spacing, origin, axis directions) may differ by :data:`_GRID_TOLERANCE` of the
    smallest spacing of ``volumeNode``. Parent transforms are not compared.
    """
    otherImage = otherNode.GetImageData()
    if otherImage is None or otherImage.GetDimensions() != volumeNode.GetImageData().GetDimensions():
        return False
    matrix, otherMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    otherNode.GetIJKToRASMatrix(otherMatrix)
    return np.allclose(slicer.util.arrayFromVTKMatrix(matrix), slicer.util.arrayFromVTKMatrix(otherMatrix), rtol=0.0,
                       atol=_GRID_TOLERANCE * min(volumeNode.GetSpacing()))


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
    """Transform from ``sourceNode``'s coordinate frame to ``targetNode``'s, or None when they share a frame.

    A ``vtkTransform`` (one matrix) when every transform on the way is linear: Slicer's resampling
    then maps voxel grids exactly. The ``vtkGeneralTransform`` that ``GetTransformBetweenNodes``
    builds for two different parents holds an inverted general transform, which
    ``vtkOrientedImageDataResample`` does not take for linear, so it would resample by nearest
    neighbour with voxel centres off by rounding.
    """
    sourceParent, targetParent = sourceNode.GetParentTransformNode(), targetNode.GetParentTransformNode()
    if sourceParent is targetParent:
        return None
    if all(parent is None or parent.IsTransformToWorldLinear() for parent in (sourceParent, targetParent)):
        matrix = vtk.vtkMatrix4x4()
        slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(sourceParent, targetParent, matrix)
        transform = vtk.vtkTransform()
        transform.SetMatrix(matrix)
        return transform
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(sourceParent, targetParent, transform)
    return transform
