"""FetalInpaintLib feature export, evaluation and probe on small inputs and one real stack."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the Python 3.9 check runs without torch

from FetalInpaintLib.errors import FetalInpaintError, InvalidVolumeError
from FetalInpaintLib.evaluation import evaluate_inpainting, format_table, psnr
from FetalInpaintLib.features import encode_volume, patch_embeddings, plot_embedding, write_embedding_csv, write_feature_volume
from FetalInpaintLib.model import InpaintingAutoencoder
from FetalInpaintLib.probe import cross_validate, labelled_patches, latent_features, raw_features, window_means

METADATA = {"normalization": {"percentiles": [0.5, 99.5]}, "patch_size": 16}

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return InpaintingAutoencoder(base_channels=4, depth=2).eval()


def test_encode_volume_matches_the_volume_grid_along_the_acquisition_axis(model):
    volume = np.random.default_rng(0).random((30, 5, 22)).astype(np.float32)
    features = encode_volume(model, volume, (1.0, 4.0, 1.0), METADATA)  # thick axis 1
    assert features.shape == (16, 30, 5, 22) and features.dtype == np.float32
    reduced = encode_volume(model, volume, (1.0, 4.0, 1.0), METADATA, pca_components=3)
    assert reduced.shape == (3, 30, 5, 22)
    # PCA commutes with the bilinear upsampling: components are centred over the volume.
    assert abs(reduced.mean()) < 0.05 * reduced.std()
    with pytest.raises(FetalInpaintError, match="pca_components"):
        encode_volume(model, volume, (1.0, 4.0, 1.0), METADATA, pca_components=99)
    with pytest.raises(InvalidVolumeError, match="NaN"):
        encode_volume(model, np.full((2, 8, 8), np.nan), (1.0, 1.0, 1.0), METADATA)


def test_encode_volume_is_slice_wise_and_upsampled_from_the_bottleneck(model):
    volume = np.random.default_rng(1).random((3, 16, 16)).astype(np.float32)
    features = encode_volume(model, volume, (3.0, 1.0, 1.0), METADATA)
    from FetalInpaintLib.data import normalize_intensity

    normalized, _ = normalize_intensity(volume)
    with torch.no_grad():
        code = model.encode(torch.as_tensor(normalized[1:2, None]))  # (1, 16, 4, 4): one cell per 4x4 pixels
        expected = torch.nn.functional.interpolate(code, size=(16, 16), mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(features[:, 1], expected.numpy(), rtol=1e-4, atol=1e-6)
    # Bilinear upsampling keeps the mean of each channel (the map is a smooth version of the bottleneck).
    np.testing.assert_allclose(features[:, 1].mean(axis=(1, 2)), code[0].mean(dim=(1, 2)).numpy(), rtol=1e-3, atol=1e-6)


def test_feature_volume_and_embedding_files(model, tmp_path):
    import SimpleITK as sitk

    volume = np.random.default_rng(2).random((4, 32, 32)).astype(np.float32)
    features = encode_volume(model, volume, (3.0, 1.0, 1.0), METADATA, pca_components=2)
    path = write_feature_volume(features, (3.0, 1.0, 1.0), tmp_path / "f.nrrd")
    image = sitk.ReadImage(path)
    assert image.GetSize() == (32, 32, 4) and image.GetNumberOfComponentsPerPixel() == 2
    mask = np.zeros(volume.shape, bool)
    mask[:, 8:24, 8:24] = True
    table = patch_embeddings(model, volume, (3.0, 1.0, 1.0), METADATA, mask=mask, stride=8)
    assert table["embeddings"].shape == (len(table["positions"]), 16)
    assert table["mask_fraction"].max() == 1.0 and table["mask_fraction"].min() == 0.25
    write_embedding_csv(table, tmp_path / "e.csv")
    assert (tmp_path / "e.csv").read_text().splitlines()[0].startswith("slice,row,col,mask_fraction,e0")
    coords = plot_embedding(table["embeddings"], table["mask_fraction"] >= 0.5, tmp_path / "t.png")
    assert coords.shape == (len(table["positions"]), 2) and (tmp_path / "t.png").stat().st_size > 0


def test_evaluation_metrics_and_baselines(model):
    y, x = np.mgrid[0:16, 0:16]
    patches = np.stack([0.5 + 0.3 * np.sin(x / 3.0 + k) * np.cos(y / 4.0) for k in range(6)]).astype(np.float32)
    assert psnr(patches, patches + 0.1) == pytest.approx(20.0)
    rows = evaluate_inpainting(model, patches, corruptors=("holes",), seeds=(0, 1))
    by = {r["method"]: r for r in rows}
    assert set(by) == {"model", "mean", "biharmonic"}
    # Smooth images: biharmonic beats mean fill in the hidden region; whole-image PSNR is higher.
    assert by["biharmonic"]["psnr_hidden"][0] > by["mean"]["psnr_hidden"][0] + 3
    assert by["mean"]["psnr_whole"][0] > by["mean"]["psnr_hidden"][0]
    assert "| holes | biharmonic |" in format_table(rows)


def test_probe_separates_an_obvious_region_and_groups_by_volume(model):
    rng = np.random.default_rng(0)
    volumes, masks = [], []
    for k in range(3):
        volume = rng.normal(0.3, 0.05, (3, 48, 48)).astype(np.float32)
        mask = np.zeros(volume.shape, bool)
        mask[:, 8 + k:28 + k, 10:30] = True
        volume[mask] += 0.5
        volumes.append(volume)
        masks.append(mask)
    parts = [labelled_patches(v, m, (3.0, 1.0, 1.0), patch_size=16, stride=4) for v, m in zip(volumes, masks)]
    labels = np.concatenate([p["labels"] for p in parts])
    groups = np.concatenate([np.full(len(p["labels"]), i) for i, p in enumerate(parts)])
    assert labels.sum() > 0 and (labels == 0).sum() > 0
    raw = np.concatenate([raw_features(p["patches"], size=4) for p in parts])
    result = cross_validate(raw, labels, groups, "linear")
    assert result["balanced_accuracy"][0] > 0.9 and len(result["folds_auroc"]) == 3
    latent = np.concatenate([latent_features(model, p["patches"]) for p in parts])
    assert latent.shape == (len(labels), 16)
    fv = np.stack([volumes[0], -volumes[0]], axis=-1)
    means = window_means(fv, 0, parts[0]["positions"], 16)
    s, r, c = parts[0]["positions"][0]
    assert means[0, 0] == pytest.approx(volumes[0][s, r:r + 16, c:c + 16].mean(), rel=1e-4)
    with pytest.raises(FetalInpaintError, match="two volumes"):
        cross_validate(raw[groups == 0], labels[groups == 0], groups[groups == 0])


def test_export_of_a_real_clinical_stack(model, shared_data):
    from conftest import load_case_arrays, load_cases

    row = load_cases("fetal_mri_mialsrtk_sub01")[0]
    image, target, spacing = load_case_arrays(row)
    features = encode_volume(model, image, spacing, METADATA, pca_components=4)
    assert features.shape == (4,) + image.shape and np.isfinite(features).all()
