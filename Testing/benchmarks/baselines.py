"""Baseline segmenters of the robot-user benchmarks: ``predict(strokes) -> bool mask`` for the
binary benchmark (stroke values 1 background, 2 foreground) and ``predict_labels(strokes) ->
label map`` for the multi-class one (stroke values are the class values).

They reproduce the reference harness (../shared/bench/robot.py) so that figures match it:
Slicer's GrowCut ("Grow from seeds", vtkImageGrowCutSegment from slicer-core) restricted to
the seeds' extent as Slicer's effect does, or on the full volume; scikit-image's trainable
segmentation; the reference paper's Table I random forest.
"""

import numpy as np
from scipy import ndimage as ndi

FOREGROUND = 2


class GrowCut:
    """Slicer's Grow from seeds on the seeds' extent (``restrict_extent``) or the full volume."""

    def __init__(self, image, spacing, axis, restrict_extent=True):
        self.image = np.ascontiguousarray(image, np.float32)
        self.spacing = spacing
        self.restrict_extent = restrict_extent

    def _vtk_image(self, array, vtk_type):
        from vtkmodules.util import numpy_support
        from vtkmodules.vtkCommonDataModel import vtkImageData

        image = vtkImageData()
        image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
        image.SetSpacing(self.spacing[2], self.spacing[1], self.spacing[0])
        scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True, array_type=vtk_type)
        image.GetPointData().SetScalars(scalars)
        return image

    def _grow(self, image, seeds):
        """Labels grown from ``seeds`` (int16 class values, 0 unpainted) over ``image``."""
        import slicer
        from vtkmodules.util import numpy_support
        from vtkmodules.util.vtkConstants import VTK_FLOAT, VTK_SHORT

        grow = slicer.vtkImageGrowCutSegment()
        grow.SetIntensityVolume(self._vtk_image(image, VTK_FLOAT))
        grow.SetSeedLabelVolume(self._vtk_image(seeds.astype(np.int16), VTK_SHORT))
        grow.SetDistancePenalty(0.0)  # Slicer's default seed locality
        grow.Update()
        output = numpy_support.vtk_to_numpy(grow.GetOutput().GetPointData().GetScalars())
        return output.reshape(image.shape)

    def predict(self, strokes):
        return self.predict_labels(strokes) == FOREGROUND

    def predict_labels(self, strokes):
        if self.image.shape[0] == 1:  # GrowCut needs a 3D extent: stack the image thrice, read the middle
            empty = np.zeros_like(strokes)
            stacked = self._grow(np.concatenate([self.image] * 3), np.concatenate([empty, strokes, empty]))
            return stacked[1:2]
        if not self.restrict_extent:
            return self._grow(self.image, strokes)
        # The seeds' bounding box (all classes) grown by max(3 voxels, 20 % of its size) per axis, as the
        # reference harness does; Slicer's effect (5.6-5.12) grows it by 10 % (extentGrowthRatio in
        # AbstractScriptedSegmentEditorAutoCompleteEffect.py), so this box is a little larger.
        painted = np.nonzero(strokes)
        low = np.array([a.min() for a in painted])
        high = np.array([a.max() for a in painted]) + 1
        margin = np.maximum(3, (0.2 * (high - low)).astype(int))
        low, high = np.maximum(0, low - margin), np.minimum(strokes.shape, high + margin)
        box = tuple(slice(a, b) for a, b in zip(low, high))
        labels = np.zeros(strokes.shape, np.int16)  # outside the extent: unlabelled, as in Slicer
        labels[box] = self._grow(self.image[box], strokes[box])
        return labels


class ForestOnFeatures:
    """A random forest trained on painted voxels of a precomputed (voxels, features) table."""

    forest_params = {}

    def __init__(self, image, spacing, axis, seed=0):
        self.table = self.features(image, spacing, axis)
        self.seed = seed

    def training_set(self, table, labels):
        return table, labels

    def probabilities(self, strokes):
        """Stroke classes (sorted) and the forest's (voxels, classes) probabilities after training on ``strokes``."""
        from sklearn.ensemble import RandomForestClassifier

        painted = (strokes > 0).ravel()
        table, labels = self.training_set(self.table[painted], strokes.ravel()[painted])
        forest = RandomForestClassifier(**{**self.forest_params, "random_state": self.seed}).fit(table, labels)
        probability = np.empty((self.table.shape[0], len(forest.classes_)), np.float32)
        block = 1 << 20
        for start in range(0, self.table.shape[0], block):
            probability[start:start + block] = forest.predict_proba(self.table[start:start + block])
        return forest.classes_, probability

    def predict(self, strokes):
        classes, probability = self.probabilities(strokes)
        return probability[:, list(classes).index(FOREGROUND)].reshape(strokes.shape) >= 0.5

    def predict_labels(self, strokes):
        classes, probability = self.probabilities(strokes)
        return classes[np.argmax(probability, axis=1)].reshape(strokes.shape)


class SkimageTrainable(ForestOnFeatures):
    """scikit-image trainable segmentation: ``multiscale_basic_features`` + random forest."""

    forest_params = dict(n_estimators=50, n_jobs=-1, max_depth=10, max_samples=0.05)

    def features(self, image, spacing, axis):
        from skimage.feature import multiscale_basic_features

        volume = image[0] if image.shape[0] == 1 else image
        table = multiscale_basic_features(volume, intensity=True, edges=True, texture=True, sigma_min=1, sigma_max=16)
        return table.reshape(-1, table.shape[-1]).astype(np.float32)


class PaperTable1(ForestOnFeatures):
    """The reference paper's Table I: per-slice 2D filters, forest of 50 trees of depth 50 on class-balanced resamples."""

    forest_params = dict(n_estimators=50, max_depth=50, criterion="gini", max_features="sqrt",
                         oob_score=True, bootstrap=True, n_jobs=-1)

    def features(self, image, spacing, axis):
        from skimage.filters.rank import entropy
        from skimage.morphology import disk

        slices = np.moveaxis(image, axis, 0)
        low, high = np.percentile(slices, [0.5, 99.5])
        planes = []
        for plane in slices:
            u8 = (np.clip((plane - low) / (high - low + 1e-6), 0, 1) * 255).astype(np.uint8)
            channels = [plane]
            channels += [entropy(u8, disk(r)).astype(np.float32) for r in (1, 3)]
            channels += [np.sqrt(np.maximum(ndi.uniform_filter(plane * plane, k) - ndi.uniform_filter(plane, k) ** 2, 0)) for k in (3, 5)]
            channels += [ndi.gaussian_filter(plane, s) for s in (3, 5)]
            channels += [ndi.gaussian_gradient_magnitude(plane, s) for s in (3, 5)]
            channels += [ndi.gaussian_laplace(plane, s) for s in (2, 4, 8, 16, 32)]
            channels += [ndi.maximum_filter(plane, k) for k in (1, 5, 9)] + [ndi.minimum_filter(plane, k) for k in (5, 9)]
            channels += [ndi.uniform_filter(plane, 5)]
            planes.append(np.stack(channels, -1))
        table = np.moveaxis(np.stack(planes), 0, axis)
        return table.reshape(-1, table.shape[-1]).astype(np.float32)

    def training_set(self, table, labels):
        # Table I: resample so every class has the same number of samples (in class order, so the
        # binary case draws background then foreground as the reference harness does).
        rng = np.random.default_rng(self.seed)
        classes = np.unique(labels)
        per_class = len(labels) // len(classes)
        index = np.concatenate([rng.choice(np.nonzero(labels == value)[0], per_class) for value in classes])
        return table[index], labels[index]
