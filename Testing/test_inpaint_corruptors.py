"""FetalInpaintLib corruptors and data helpers: hidden fractions, reproducibility, split by volume."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the Python 3.9 check runs without torch

from FetalInpaintLib.corruptors import CORRUPTORS, corrupt_batch, corrupt_holes, corrupt_shapes, corrupt_toss, make_corruptor
from FetalInpaintLib.data import acquisition_axis, extract_patches, normalize_intensity, split_by_volume, split_hash
from FetalInpaintLib.errors import FetalInpaintError, InvalidVolumeError


@pytest.mark.parametrize("name", sorted(CORRUPTORS))
@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.4, 0.8, 0.95])
def test_corruptors_hide_the_requested_fraction(name, fraction):
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32) + 1.0
    corrupt = make_corruptor(name, strength=fraction)
    hidden = []
    for seed in range(40):
        corrupted, mask = corrupt(image, seed)
        assert mask.dtype == bool and mask.shape == image.shape
        assert np.all(corrupted[mask] == 0.0) and np.array_equal(corrupted[~mask], image[~mask])
        hidden.append(mask.mean())
    # Holes and shapes stop at the first region that reaches the target: overshoot < one region.
    assert abs(np.mean(hidden) - fraction) < 0.03
    if name != "toss":
        assert min(hidden) >= fraction


@pytest.mark.parametrize("corrupt", [corrupt_holes, corrupt_shapes, corrupt_toss])
def test_corruptors_are_reproducible_from_a_seed_or_generator(corrupt):
    image = np.ones((40, 50), np.float32)
    assert np.array_equal(corrupt(image, 7)[1], corrupt(image, 7)[1])
    assert np.array_equal(corrupt(image, np.random.default_rng(3))[1], corrupt(image, np.random.default_rng(3))[1])
    assert not np.array_equal(corrupt(image, 1)[1], corrupt(image, 2)[1])


def test_explicit_hole_count_and_size():
    _, mask = corrupt_holes(np.ones((64, 64)), rng=0, n_holes=1, hole_size=10)
    assert mask.sum() == 100
    assert not corrupt_holes(np.ones((64, 64)), rng=0, n_holes=0)[1].any()
    assert not corrupt_shapes(np.ones((64, 64)), rng=0, n_shapes=0)[1].any()
    rows, cols = np.nonzero(mask)
    assert np.ptp(rows) == 9 and np.ptp(cols) == 9


def test_shapes_of_each_kind_have_the_expected_area():
    for kind in ("circle", "triangle", "square"):
        areas = [corrupt_shapes(np.ones((64, 64)), rng=s, n_shapes=1, size=20, kinds=(kind,))[1].sum() for s in range(30)]
        # Diameters 10..20 px: mean area of the equal-area circle ~ pi/4 * E[d^2] ~ 183 px.
        assert 100 < np.mean(areas) < 280, kind


def test_batched_torch_corruption_matches_the_fraction_per_image():
    images = torch.rand(32, 1, 48, 48) + 1.0
    generator = torch.Generator().manual_seed(0)
    for name in CORRUPTORS:
        corrupted, mask = corrupt_batch(images, name, 0.25, generator=generator)
        assert mask.shape == (32, 1, 48, 48) and mask.dtype == torch.bool
        per_image = mask.float().mean(dim=(1, 2, 3))
        assert abs(per_image.mean().item() - 0.25) < 0.03
        assert torch.all(corrupted[mask] == 0) and torch.equal(corrupted[~mask], images[~mask])


def test_bad_corruptor_settings_raise():
    with pytest.raises(FetalInpaintError, match="unknown corruptor"):
        make_corruptor("blur")
    with pytest.raises(FetalInpaintError, match="fraction of pixels"):
        corrupt_toss(np.ones((8, 8)), 0, p=1.5)
    with pytest.raises(FetalInpaintError, match="2D image"):
        corrupt_holes(np.ones((2, 8, 8)), 0)


def test_split_by_volume_never_shares_a_volume_and_is_stable():
    ids = [f"case{i}.nii.gz" for i in range(10)]
    train_ids, val_ids, digest = split_by_volume(ids, val_fraction=0.3, seed=1)
    assert not set(train_ids) & set(val_ids) and sorted(train_ids + val_ids) == sorted(ids)
    assert len(val_ids) == 3
    assert split_by_volume(list(reversed(ids)), 0.3, seed=1)[2] == digest  # order does not matter
    assert split_hash(train_ids, val_ids) == digest
    assert split_by_volume(ids, 0.3, seed=2)[2] != digest
    assert split_by_volume(["only"], 0.3)[:2] == (["only"], [])
    with pytest.raises(InvalidVolumeError, match="no volume"):
        split_by_volume([])


def test_normalisation_axis_and_patches():
    volume = np.random.default_rng(0).normal(100, 10, (5, 40, 50)).astype(np.float32)
    normalized, params = normalize_intensity(volume)
    assert normalized.min() == 0.0 and normalized.max() == 1.0 and params["high"] > params["low"]
    assert acquisition_axis((3.3, 1.125, 1.125)) == 0
    assert acquisition_axis((0.8, 3.0, 0.8)) == 1
    assert acquisition_axis((0.8, 0.8, 0.8)) == 0  # isotropic: documented default
    assert acquisition_axis((1.0, 1.0, 1.0), shape=(64, 64, 1)) == 2  # a single image: its one slice
    assert acquisition_axis((0.8, 3.0, 0.8), shape=(1, 40, 40)) == 0
    patches, positions = extract_patches(normalized, patch_size=16, stride=8)
    assert patches.shape[1:] == (16, 16) and len(patches) == 5 * 4 * 5
    s, r, c = positions[7]
    assert np.array_equal(patches[7], normalized[s, r:r + 16, c:c + 16])
    with pytest.raises(InvalidVolumeError, match="smaller than one 64x64 patch"):
        extract_patches(normalized, patch_size=64)


def test_setting_names_match_the_implementations():
    from FetalInpaintLib.config import CORRUPTOR_NAMES, PREFILL_NAMES
    from FetalInpaintLib.model import PREFILLS

    assert sorted(CORRUPTOR_NAMES) == sorted(CORRUPTORS) and sorted(PREFILL_NAMES) == sorted(PREFILLS)
