"""Baseline segmenters of the robot-user benchmark, each ``predict(strokes) -> bool mask``.

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
        import slicer
        from vtkmodules.util import numpy_support
        from vtkmodules.util.vtkConstants import VTK_FLOAT, VTK_SHORT

        grow = slicer.vtkImageGrowCutSegment()
        grow.SetIntensityVolume(self._vtk_image(image, VTK_FLOAT))
        grow.SetSeedLabelVolume(self._vtk_image(seeds.astype(np.int16), VTK_SHORT))
        grow.SetDistancePenalty(0.0)  # Slicer's default seed locality
        grow.Update()
        output = numpy_support.vtk_to_numpy(grow.GetOutput().GetPointData().GetScalars())
        return output.reshape(image.shape) == FOREGROUND

    def predict(self, strokes):
        if self.image.shape[0] == 1:  # GrowCut needs a 3D extent: stack the image thrice, read the middle
            empty = np.zeros_like(strokes)
            stacked = self._grow(np.concatenate([self.image] * 3), np.concatenate([empty, strokes, empty]))
            return stacked[1:2]
        if not self.restrict_extent:
            return self._grow(self.image, strokes)
        # Slicer's effect: the seeds' bounding box grown by max(3 voxels, 20 % of its size) per axis.
        painted = np.nonzero(strokes)
        low = np.array([a.min() for a in painted])
        high = np.array([a.max() for a in painted]) + 1
        margin = np.maximum(3, (0.2 * (high - low)).astype(int))
        low, high = np.maximum(0, low - margin), np.minimum(strokes.shape, high + margin)
        box = tuple(slice(a, b) for a, b in zip(low, high))
        mask = np.zeros(strokes.shape, bool)
        mask[box] = self._grow(self.image[box], strokes[box])
        return mask


class ForestOnFeatures:
    """A random forest trained on painted voxels of a precomputed (voxels, features) table."""

    forest_params = {}

    def __init__(self, image, spacing, axis, seed=0):
        self.table = self.features(image, spacing, axis)
        self.seed = seed

    def training_set(self, table, labels):
        return table, labels

    def predict(self, strokes):
        from sklearn.ensemble import RandomForestClassifier

        painted = (strokes > 0).ravel()
        table, labels = self.training_set(self.table[painted], strokes.ravel()[painted])
        forest = RandomForestClassifier(**{**self.forest_params, "random_state": self.seed}).fit(table, labels)
        column = list(forest.classes_).index(FOREGROUND)
        probability = np.empty(self.table.shape[0], np.float32)
        block = 1 << 20
        for start in range(0, self.table.shape[0], block):
            probability[start:start + block] = forest.predict_proba(self.table[start:start + block])[:, column]
        return probability.reshape(strokes.shape) >= 0.5


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
        # Table I: resample so both classes have the same number of samples.
        rng = np.random.default_rng(self.seed)
        half = len(labels) // 2
        background = rng.choice(np.nonzero(labels == 1)[0], half)
        foreground = rng.choice(np.nonzero(labels == FOREGROUND)[0], half)
        index = np.concatenate([background, foreground])
        return table[index], labels[index]
