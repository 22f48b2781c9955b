"""The benchmarks' robot user: multi-class strokes, correction strokes and the round-0 drawing styles."""

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.morphology import disk

import robot_user


def disk_mask(shape, centre, radius):
    rows, columns = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius ** 2


@pytest.fixture
def three_classes():
    """Label map 7 x 64 x 64: background 1, class 2 as two discs, class 3 a square that only slices 2-4 hold."""
    truth = np.ones((7, 64, 64), np.uint8)
    for index in range(1, 6):
        truth[index][disk_mask((64, 64), (20, 18), 8 + index % 3)] = 2
        truth[index][disk_mask((64, 64), (20, 46), 7)] = 2
    truth[2:5, 38:54, 24:44] = 3
    truth[3, 36:56, 22:46] = 3  # slice 3: every class, the smallest class largest
    return truth


@pytest.fixture
def disc_target():
    target = np.zeros((9, 80, 80), bool)
    for index in range(1, 8):
        target[index] = disk_mask((80, 80), (40, 40), 10 + min(index, 8 - index))
    return target


def painted_slices(strokes):
    return np.flatnonzero(strokes.any(axis=(1, 2)))


def encloses(stroke, region):
    """True when the unpainted area ``stroke`` closes in holds all of ``region``."""
    holes = ndi.binary_fill_holes(stroke) & ~stroke
    return bool(holes[region].all())


def test_class_round_zero_paints_every_class_component_on_the_best_slice_with_its_true_class(three_classes):
    strokes = robot_user.initial_class_strokes(three_classes, axis=0)

    np.testing.assert_array_equal(painted_slices(strokes), [3])
    painted = strokes > 0
    np.testing.assert_array_equal(strokes[painted], three_classes[painted])
    plane, plane_strokes = three_classes[3], strokes[3]
    for value in (1, 2, 3):
        components, count = ndi.label(plane == value)
        for component in range(1, count + 1):
            inside = (components == component) & (plane_strokes == value)
            assert ndi.label(inside)[1] == 1, f"class {value} component {component}: not one stroke"
    assert ndi.label(plane == 2)[1] == 2  # the two discs: two strokes of class 2


def test_class_correction_stroke_lands_in_the_largest_error_blob_with_the_true_classes(three_classes):
    prediction = three_classes.copy()
    prediction[3][three_classes[3] == 3] = 2  # large error blob: the square (class 3) taken as class 2
    prediction[3][three_classes[3] == 2] = 2
    prediction[1, 2:6, 2:6] = 2  # small error blob elsewhere
    strokes = np.zeros_like(three_classes)

    assert robot_user.add_class_correction_stroke(strokes, three_classes, prediction, axis=0)

    error = prediction != three_classes
    components, _ = ndi.label(error)
    painted = strokes > 0
    assert painted.any() and set(np.unique(components[painted])) == {components[3, 45, 33]}
    np.testing.assert_array_equal(strokes[painted], three_classes[painted])


def test_class_correction_stroke_across_a_boundary_carries_both_classes():
    truth = np.ones((3, 40, 40), np.uint8)
    truth[:, 10:30, 10:20] = 2
    truth[:, 10:30, 20:30] = 3
    prediction = np.ones_like(truth)  # one error blob over classes 2 and 3
    strokes = np.zeros_like(truth)

    assert robot_user.add_class_correction_stroke(strokes, truth, prediction, axis=0)

    assert set(np.unique(strokes[strokes > 0])) == {2, 3}
    np.testing.assert_array_equal(strokes[strokes > 0], truth[strokes > 0])
    assert not robot_user.add_class_correction_stroke(strokes, truth, truth.copy(), axis=0)


def test_binary_correction_stroke_lands_in_the_largest_error_blob(disc_target):
    prediction = disc_target.copy()
    prediction[4][disk_mask((80, 80), (40, 40), 6)] = False  # a miss inside the disc
    prediction[2, 70:72, 70:72] = True  # a small false positive
    strokes = np.zeros(disc_target.shape, np.uint8)

    assert robot_user.add_correction_stroke(strokes, disc_target, prediction, axis=0)

    painted = strokes > 0
    assert painted.any() and (prediction != disc_target)[painted].all()
    assert set(np.unique(strokes[painted])) == {robot_user.FOREGROUND}
    np.testing.assert_array_equal(painted_slices(strokes), [4])


def test_a_slipped_correction_stroke_paints_the_same_voxels_with_the_other_class(disc_target):
    prediction = disc_target.copy()
    prediction[4][disk_mask((80, 80), (40, 40), 6)] = False
    right = np.zeros(disc_target.shape, np.uint8)
    slipped = np.zeros(disc_target.shape, np.uint8)

    robot_user.add_correction_stroke(right, disc_target, prediction, axis=0)
    robot_user.add_correction_stroke(slipped, disc_target, prediction, axis=0, wrong_class=True)

    np.testing.assert_array_equal(slipped > 0, right > 0)
    assert set(np.unique(slipped[slipped > 0])) == {robot_user.BACKGROUND}


def test_an_erased_slip_leaves_the_strokes_painted_over_it(three_classes):
    # The erase style's slip paints the class shown on the largest error blob; erasing it
    # later removes only the voxels that still hold the slipped class.
    prediction = three_classes.copy()
    prediction[3][three_classes[3] == 3] = 2
    strokes = np.zeros_like(three_classes)
    slip = robot_user.slip_stroke(strokes, lambda s: robot_user.add_class_correction_stroke(
        s, three_classes, prediction, axis=0, wrong_class=True))
    painted = slip > 0
    assert painted.any() and (strokes == slip).all()
    np.testing.assert_array_equal(slip[painted], prediction[painted])
    assert (slip[painted] != three_classes[painted]).all()
    corrected = np.argwhere(painted)[0]
    strokes[tuple(corrected)] = three_classes[tuple(corrected)]  # a later stroke over the slip
    robot_user.erase_slip(strokes, slip)
    assert np.count_nonzero(strokes) == 1 and strokes[tuple(corrected)] == three_classes[tuple(corrected)]
    assert robot_user.slip_stroke(strokes, lambda s: False) is None


def test_ring_is_closed_around_the_target_and_arcs_are_not(disc_target):
    plane = disc_target[4]
    ring = robot_user.initial_strokes(disc_target, 0, "ring")[4] == robot_user.BACKGROUND
    arcs = robot_user.initial_strokes(disc_target, 0, "arcs")[4] == robot_user.BACKGROUND

    assert encloses(ring, plane)
    assert ndi.label(ring, structure=np.ones((3, 3)))[1] == 1
    assert not (ndi.binary_fill_holes(arcs) & ~arcs).any()
    assert ndi.label(arcs, structure=np.ones((3, 3)))[1] == 4
    assert arcs.sum() < ring.sum() and not (arcs & ~ring).any()


def test_dabs_are_a_few_short_background_strokes(disc_target):
    strokes = robot_user.initial_strokes(disc_target, 0, "dabs")
    dabs = strokes[4] == robot_user.BACKGROUND

    components, count = ndi.label(dabs, structure=np.ones((3, 3)))
    assert count == 4
    assert max(ndi.sum_labels(dabs, components, range(1, count + 1))) <= 30
    assert not (dabs & disc_target[4]).any()


def test_thick_brush_covers_the_robot_strokes_with_a_wider_brush_and_keeps_true_classes(disc_target):
    robot = robot_user.initial_strokes(disc_target, 0, "robot")
    thick = robot_user.initial_strokes(disc_target, 0, "thick")

    np.testing.assert_array_equal(painted_slices(thick), painted_slices(robot))
    brushed = ndi.binary_dilation(robot > 0, structure=disk(2)[np.newaxis])  # a brush of radius 2
    assert (thick[brushed] > 0).all() and (thick > 0).sum() > 2 * (robot > 0).sum()
    expected = np.where(disc_target, robot_user.FOREGROUND, robot_user.BACKGROUND)
    np.testing.assert_array_equal(thick[thick > 0], expected[thick > 0])


def test_two_slices_paints_the_robot_strokes_on_two_slices_apart(disc_target, three_classes):
    binary = robot_user.initial_strokes(disc_target, 0, "two-slices")
    slices = painted_slices(binary)
    assert len(slices) == 2 and 4 in slices
    np.testing.assert_array_equal(binary[4], robot_user.initial_strokes(disc_target, 0, "robot")[4])

    classes = robot_user.initial_class_strokes(three_classes, 0, "two-slices")
    assert len(painted_slices(classes)) == 2
    np.testing.assert_array_equal(classes[classes > 0], three_classes[classes > 0])


def test_loops_draw_background_arcs_and_a_closed_loop_around_the_whole_body(disc_target):
    background = robot_user.initial_strokes(disc_target, 0, "loops")[4] == robot_user.BACKGROUND
    near = ndi.binary_dilation(disc_target[4], iterations=8)

    assert encloses(background & ~near, near)  # the far loop closes around target and arcs
    arcs = background & near
    assert arcs.any() and not (ndi.binary_fill_holes(arcs) & ~arcs).any()


def test_ring_later_paints_dabs_then_closes_the_ring_as_its_first_correction(disc_target, three_classes):
    strokes = robot_user.initial_strokes(disc_target, 0, "ring-later")
    np.testing.assert_array_equal(strokes, robot_user.initial_strokes(disc_target, 0, "dabs"))
    robot_user.add_ring_stroke(strokes, disc_target, 0)
    np.testing.assert_array_equal(strokes, robot_user.initial_strokes(disc_target, 0, "ring"))

    classes = robot_user.initial_class_strokes(three_classes, 0, "ring-later")
    np.testing.assert_array_equal(classes, robot_user.initial_class_strokes(three_classes, 0, "dabs"))
    robot_user.add_class_ring_stroke(classes, three_classes, 0)
    np.testing.assert_array_equal(classes, robot_user.initial_class_strokes(three_classes, 0, "ring"))


def test_class_styles_draw_the_largest_class_around_the_others(three_classes):
    others = three_classes[3] != 1
    ring = robot_user.initial_class_strokes(three_classes, 0, "ring")[3]
    assert encloses(ring == 1, others)
    arcs = robot_user.initial_class_strokes(three_classes, 0, "arcs")[3]
    assert not (ndi.binary_fill_holes(arcs == 1) & ~(arcs == 1)).any()
    for strokes in (ring, arcs):
        assert set(np.unique(strokes[others & (strokes > 0)])) == {2, 3}  # the others keep their skeletons
        np.testing.assert_array_equal(strokes[strokes > 0], three_classes[3][strokes > 0])
    with pytest.raises(ValueError, match="choose from"):
        robot_user.initial_class_strokes(three_classes, 0, "loops")


def test_growcut_grows_every_seeded_class():
    from baselines import GrowCut

    image = np.full((6, 30, 30), 10.0, np.float32)
    image[:, :, 10:20] = 100.0
    image[:, :, 20:] = 200.0
    strokes = np.zeros(image.shape, np.uint8)
    strokes[3, 15, 5], strokes[3, 15, 15], strokes[3, 15, 25] = 1, 2, 3

    labels = GrowCut(image, (1.0, 1.0, 1.0), 0, restrict_extent=False).predict_labels(strokes)

    np.testing.assert_array_equal(labels[:, :, :10], 1)
    np.testing.assert_array_equal(labels[:, :, 10:20], 2)
    np.testing.assert_array_equal(labels[:, :, 20:], 3)
