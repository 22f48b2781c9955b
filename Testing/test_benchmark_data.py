"""The benchmark's case loader: thick-slice versions of the isotropic atlas volumes."""

import numpy as np

from conftest import SHARED_DATA, load_cases


def test_thicken_averages_slices_of_isotropic_volumes_only():
    from robot_benchmark import load_case

    atlas = load_cases("fetal_mri_sb_atlas")[0]
    image, target, spacing, axis = load_case(atlas, SHARED_DATA)
    thick_image, thick_target, thick_spacing, thick_axis = load_case(atlas, SHARED_DATA, thicken=4)

    n_slices = image.shape[0] // 4
    assert thick_image.shape == (n_slices,) + image.shape[1:]
    assert thick_spacing == (4 * spacing[0],) + spacing[1:]
    assert axis == 0 and thick_axis == 0
    np.testing.assert_allclose(thick_image[3], image[12:16].mean(axis=0), rtol=1e-6)
    # A thick voxel is target where most of its four thin voxels are.
    np.testing.assert_array_equal(thick_target[3], target[12:16].sum(axis=0) > 2)
    assert 0.9 < thick_target.sum() * 4 / target.sum() < 1.1

    stack = load_cases("fetal_mri_mialsrtk_sub01")[0]
    as_is, thickened = load_case(stack, SHARED_DATA), load_case(stack, SHARED_DATA, thicken=4)
    np.testing.assert_array_equal(as_is[0], thickened[0])
    assert as_is[2] == thickened[2]


def test_recorded_strokes_replay_the_run(tmp_path):
    """A run's recorded strokes, replayed through the same method and random state, give the same
    Dice in every round: methods replayed on them are compared on the same strokes."""
    from robot_benchmark import recording_path, replay_case, run_case

    head = load_cases("us_hc18_subset")[0]
    recording = recording_path(tmp_path, "us_hc18_subset", "dabs", head["case"], 1)
    drawn = run_case("engine", head, SHARED_DATA, rounds=2, cap=2, seed=1, style="dabs", record=recording)
    replayed = replay_case("engine", head, SHARED_DATA, recording, seed=1, style="dabs")
    assert len(drawn["dice"]) == 3
    assert replayed["dice"] == drawn["dice"]
    assert replayed["rounds_to_target"] == drawn["rounds_to_target"]


def test_recorded_class_strokes_replay_the_run(tmp_path):
    from multiclass_benchmark import replay_case, run_case
    from robot_benchmark import recording_path

    phantom = {"case": "phantom-seed1", "phantom_seed": 1}
    recording = recording_path(tmp_path, "phantom", "dabs", phantom["case"], 0)
    drawn = run_case("engine", phantom, tmp_path, cap=1, style="dabs", record=recording)
    replayed = replay_case("engine", phantom, tmp_path, recording, style="dabs")
    assert len(drawn["class_dice"]) == 2
    assert replayed["class_dice"] == drawn["class_dice"] and replayed["classes"] == drawn["classes"]
