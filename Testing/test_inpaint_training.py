"""FetalInpaintLib model, training, checkpoints, resume, DDP entry point and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the Python 3.9 check runs without torch

from FetalInpaintLib.corruptors import corrupt_batch
from FetalInpaintLib.control import LOCK_FILE_NAME, STOP_FILE_NAME, request_stop
from FetalInpaintLib.errors import (
    ArchitectureMismatchError,
    CheckpointError,
    FetalInpaintError,
    InvalidVolumeError,
    TrainingLockedError,
)
from FetalInpaintLib.model import InpaintingAutoencoder, biharmonic_fill, push_pull_fill
from FetalInpaintLib.training import TrainConfig, load_checkpoint, masked_l2, train
from FetalInpaintLib.train import main as train_main

LIBRARY_PARENT = Path(__file__).resolve().parents[1] / "FetalInpaint"
TINY = dict(base_channels=4, depth=2, patch_size=16, stride=8, batch_size=16, epochs=2, device="cpu")

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def phantom(shape=(4, 40, 40), seed=0):
    """Smooth bright blob with texture on a dark background."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]].astype(np.float32)
    blob = ((y - shape[1] / 2) / (shape[1] * 0.35)) ** 2 + ((x - shape[2] / 2) / (shape[2] * 0.3)) ** 2 < 1
    return (100.0 * blob + 20.0 * np.sin(x / 3.0 + seed) * np.cos(y / 4.0) + rng.normal(0, 2, shape)).astype(np.float32)




def tiny_volumes(n=3):
    return {f"phantom{i}": (phantom(seed=i), (3.0, 1.0, 1.0)) for i in range(n)}


def test_encoder_handles_any_slice_size_and_the_decoder_restores_it():
    model = InpaintingAutoencoder(base_channels=4, depth=3).eval()
    x = torch.rand(2, 1, 37, 50)
    with torch.no_grad():
        assert model.encode(x).shape == (2, 32, 5, 7)  # ceil(37 / 8), ceil(50 / 8)
        assert model(torch.cat([x, torch.zeros_like(x)], 1)).shape == (2, 1, 37, 50)
        skip = InpaintingAutoencoder(base_channels=4, depth=3, skip_connections=True).eval()
        assert skip(torch.cat([x, x], 1)).shape == (2, 1, 37, 50)


def test_push_pull_fill_interpolates_holes_and_keeps_visible_pixels():
    y, x = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 48), indexing="ij")
    ramp = (0.3 + 0.5 * x + 0.2 * y)[None, None]
    hidden = torch.zeros_like(ramp, dtype=torch.bool)
    hidden[..., 10:30, 15:35] = True
    filled = push_pull_fill(ramp.masked_fill(hidden, 0.0), hidden)
    assert torch.equal(filled[~hidden], ramp[~hidden])
    assert float((filled - ramp)[hidden].abs().mean()) < 0.03  # zeros would be off by 0.6 on average


@pytest.mark.parametrize("prefill, fill", [(True, push_pull_fill), ("biharmonic", biharmonic_fill)])
def test_prefill_model_predicts_a_correction_to_the_fill(tmp_path, prefill, fill):
    model = InpaintingAutoencoder(base_channels=4, depth=2, skip_connections=True, prefill=prefill).eval()
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    clean = torch.rand(2, 1, 24, 24)
    corrupted, mask = corrupt_batch(clean, "shapes", 0.2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prediction, filled = model.inpaint(corrupted, mask)
    torch.testing.assert_close(prediction, fill(corrupted, mask))  # zero correction = the fill
    assert torch.equal(filled[~mask], corrupted[~mask])
    with pytest.raises(ValueError, match="in_channels=2"):
        InpaintingAutoencoder(in_channels=1, prefill=prefill)
    result = train(tiny_volumes(2), TrainConfig(**TINY, prefill=prefill, skip_connections=True), tmp_path)
    reloaded, metadata = load_checkpoint(result.checkpoint_path)
    assert metadata["architecture"]["prefill"] == prefill  # True: written so by earlier versions too
    assert reloaded.prefill == ("push-pull" if prefill is True else prefill)


def test_unknown_prefill_is_refused():
    with pytest.raises(ValueError, match="biharmonic"):
        InpaintingAutoencoder(prefill="nearest")


def test_biharmonic_fill_matches_scikit_image():
    from skimage.restoration import inpaint_biharmonic

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:40, 0:40] / 40.0
    images = np.stack([np.sin(3 * x + 2 * y) * np.cos(2 * y) + 0.5 * x * x, np.exp(-((x - 0.4) ** 2 + (y - 0.6) ** 2) * 6)])
    images = (images + 0.02 * rng.standard_normal(images.shape)).astype(np.float32)
    image = torch.as_tensor(images).unsqueeze(1)
    _, hidden = corrupt_batch(image, "shapes", 0.2, generator=torch.Generator().manual_seed(1))
    ours = biharmonic_fill(image.masked_fill(hidden, 0.0), hidden)[:, 0].numpy()
    for index in range(2):
        reference = inpaint_biharmonic(images[index], hidden[index, 0].numpy())
        inside = hidden[index, 0].numpy()
        error = np.abs(ours[index] - reference)[inside]
        spread = np.abs(images[index][inside] - images[index][inside].mean()).mean()
        assert error.mean() < 0.1 * spread, (error.mean(), spread)
    visible = ~hidden
    assert torch.equal(biharmonic_fill(image, hidden)[visible], image[visible])
    assert torch.equal(biharmonic_fill(image, torch.zeros_like(hidden)), image)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    clean = torch.as_tensor(phantom((8, 24, 24)) / 120.0).unsqueeze(1)
    corrupted, mask = corrupt_batch(clean, "holes", 0.2, generator=torch.Generator().manual_seed(0))
    model = InpaintingAutoencoder(base_channels=8, depth=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(120):
        prediction, _ = model.inpaint(corrupted, mask)
        loss = masked_l2(prediction, clean, mask, whole_image_weight=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10


def test_training_writes_checkpoint_metadata_and_plot(tmp_path):
    reports = []
    result = train(tiny_volumes(), TrainConfig(**TINY), tmp_path, progress=reports.append)
    assert result.epochs_completed == 2 and not result.interrupted
    for name in ("model.pt", "model.json", "resume.pt", "history.json", "loss_curve.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    metadata = json.loads((tmp_path / "model.json").read_text())
    assert metadata["architecture"]["base_channels"] == 4 and metadata["patch_size"] == 16
    assert metadata["corruptor"]["name"] == "shapes" and metadata["normalization"]["percentiles"] == [0.5, 99.5]
    assert set(metadata["split"]["train"]).isdisjoint(metadata["split"]["val"]) and len(metadata["split"]["hash"]) == 16
    assert {"torch", "numpy", "python", "FetalInpaintLib"} <= set(metadata["versions"])
    assert reports and {"epoch", "step", "loss", "val_loss", "patches_per_s", "eta_s"} <= set(reports[-1])


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    result = train(tiny_volumes(2), TrainConfig(**TINY), tmp_path)
    first, _ = load_checkpoint(result.checkpoint_path)
    second, metadata = load_checkpoint(tmp_path)  # a folder means its model.pt
    state = torch.load(result.checkpoint_path, weights_only=True)
    x = torch.rand(3, 2, 24, 24)
    with torch.no_grad():
        assert torch.equal(first(x), second(x))
    assert all(torch.equal(state[k], v) for k, v in first.state_dict().items())
    assert not first.training and metadata["architecture"]["depth"] == 2


def test_training_is_deterministic(tmp_path):
    a = train(tiny_volumes(2), TrainConfig(**TINY), tmp_path / "a")
    b = train(tiny_volumes(2), TrainConfig(**TINY), tmp_path / "b")
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]


def test_stop_request_checkpoints_and_resume_continues(tmp_path):
    config = TrainConfig(**{**TINY, "epochs": 3, "log_every": 1})
    calls = []
    first = train(tiny_volumes(2), config, tmp_path, progress=lambda info: len(calls) >= 3 or calls.append(info) and False)
    assert first.interrupted and (tmp_path / "resume.pt").exists() and (tmp_path / "model.pt").exists()
    resumed = train(tiny_volumes(2), config, tmp_path, resume=True)
    assert not resumed.interrupted and resumed.epochs_completed == 3 and resumed.history[0]["epoch"] == 0
    with pytest.raises(FetalInpaintError, match="another split or architecture"):
        train(tiny_volumes(3), config, tmp_path, resume=True)


def test_stop_requested_at_the_end_of_an_epoch_ends_training_there(tmp_path):
    config = TrainConfig(**{**TINY, "epochs": 4, "log_every": 1000})  # progress only after each epoch
    calls = []
    result = train(tiny_volumes(2), config, tmp_path, progress=lambda info: calls.append(info) or True)
    assert len(calls) == 1 and result.interrupted and result.epochs_completed == 1
    resumed = train(tiny_volumes(2), config, tmp_path, resume=True)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    finished = train(tiny_volumes(2), config, tmp_path / "last", progress=lambda info: info["epoch"] == 3)
    assert not finished.interrupted and finished.epochs_completed == 4  # asked only once it is done


def test_early_stop_after_patience(tmp_path):
    # lr 0: only batch-norm statistics move, so the validation loss soon stops improving.
    config = TrainConfig(**{**TINY, "epochs": 8, "patience": 1, "lr": 0.0})
    result = train(tiny_volumes(2), config, tmp_path)
    assert result.stopped_early and result.epochs_completed < 8
    losses = [h["val_loss"] for h in result.history]
    assert losses[-1] >= min(losses[:-1])


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(InvalidVolumeError, match="no volume"):
        train([], TrainConfig(**TINY), tmp_path)
    with pytest.raises(InvalidVolumeError, match="no volume"):
        train([None], TrainConfig(**TINY), tmp_path)
    bad = phantom()
    bad[0, 3, 3] = np.nan
    with pytest.raises(InvalidVolumeError, match="NaN"):
        train({"a": bad}, TrainConfig(**TINY), tmp_path)
    with pytest.raises(InvalidVolumeError, match="smaller than one 16x16 patch"):
        train({"a": (np.ones((3, 10, 12), np.float32), (3.0, 1.0, 1.0))}, TrainConfig(**TINY), tmp_path)
    with pytest.raises(FetalInpaintError, match="multiple of 2\\*\\*depth"):
        train(tiny_volumes(2), TrainConfig(**{**TINY, "patch_size": 18}), tmp_path)
    assert issubclass(FetalInpaintError, ValueError)


def test_missing_corrupt_and_foreign_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "model.pt")
    train(tiny_volumes(2), TrainConfig(**{**TINY, "epochs": 1}), tmp_path)
    with pytest.raises(ArchitectureMismatchError, match="was requested"):
        load_checkpoint(tmp_path, architecture={**json.loads((tmp_path / "model.json").read_text())["architecture"], "depth": 3})
    metadata = json.loads((tmp_path / "model.json").read_text())
    metadata["architecture"]["base_channels"] = 8
    (tmp_path / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(ArchitectureMismatchError, match="do not fit"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path)
    metadata["architecture"]["base_channels"] = 4
    (tmp_path / "model.json").write_text(json.dumps(metadata))
    (tmp_path / "model.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path)


def test_ddp_entry_point_runs_two_gloo_processes(tmp_path):
    import SimpleITK as sitk

    paths = []
    for i in range(3):
        image = sitk.GetImageFromArray(phantom(seed=i))
        image.SetSpacing((1.0, 1.0, 3.0))
        paths.append(str(tmp_path / f"v{i}.nii.gz"))
        sitk.WriteImage(image, paths[-1])
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "FetalInpaintLib.train", "--volumes", *paths, "--out", str(out), "--device", "cpu",
        "--base-channels", "4", "--depth", "2", "--patch-size", "16", "--stride", "8", "--batch-size", "8",
        "--epochs", "1", "--max-steps", "3", "--log-every", "1", "--threads", "1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=LIBRARY_PARENT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and Path(summary["checkpoint"]).exists()
    assert (out / "model.json").exists() and load_checkpoint(out)[1]["architecture"]["base_channels"] == 4


def test_distributed_training_releases_its_process_group_when_it_returns(tmp_path):
    """The DistributedDataParallel wrapper, which holds the process group, is gone when train()
    returns: left to the interpreter's exit, after destroy_process_group, gloo's threads abort."""
    import gc

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        train(tiny_volumes(2), TrainConfig(**{**TINY, "epochs": 1}), tmp_path / "run")
        # type(), not isinstance(): the latter dereferences the weak proxies among the objects.
        alive = [o for o in gc.get_objects() if type(o) is torch.nn.parallel.DistributedDataParallel]
    finally:
        dist.destroy_process_group()
    assert alive == []


def test_stop_file_checkpoints_the_first_step_and_is_removed(tmp_path):
    request_stop(tmp_path)  # written before the training starts: a Stop right after Start
    result = train(tiny_volumes(2), TrainConfig(**TINY), tmp_path)
    assert result.interrupted and result.epochs_completed == 0
    assert (tmp_path / "resume.pt").exists()  # so "Resume" has something to continue
    assert not (tmp_path / STOP_FILE_NAME).exists() and not (tmp_path / LOCK_FILE_NAME).exists()
    assert train(tiny_volumes(2), TrainConfig(**TINY), tmp_path, resume=True).epochs_completed == 2


def test_a_locked_folder_is_refused_and_a_stale_lock_taken_over(tmp_path):
    import socket

    lock = tmp_path / LOCK_FILE_NAME
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": 0}))  # a live process
    with pytest.raises(TrainingLockedError, match=f"process {os.getpid()} .* is writing to"):
        train(tiny_volumes(2), TrainConfig(**TINY), tmp_path)
    assert not (tmp_path / "model.pt").exists() and lock.exists()

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    lock.write_text(json.dumps({"pid": ended.pid, "host": socket.gethostname(), "started": 0}))
    assert train(tiny_volumes(2), TrainConfig(**TINY), tmp_path).epochs_completed == 2
    assert not lock.exists()  # released at the end


def _write_volume_file(path, seed=0):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(phantom(seed=seed))
    image.SetSpacing((1.0, 1.0, 3.0))
    sitk.WriteImage(image, str(path))
    return str(path)


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_one_volume_training_prints_and_writes_strict_json(tmp_path, capsys):
    volume = _write_volume_file(tmp_path / "only.nrrd")
    code = train_main(["--volumes", volume, "--out", str(tmp_path / "run"), "--device", "cpu", "--epochs", "1",
                       "--base-channels", "4", "--depth", "2", "--patch-size", "16", "--stride", "8",
                       "--batch-size", "16", "--threads", "1"])
    assert code == 0
    records = [_strict_json(line) for line in capsys.readouterr().out.splitlines()]
    assert records[-1]["epochs"] == 1
    assert [record["val_loss"] for record in records if "val_loss" in record] == [None] * (len(records) - 1)
    history = _strict_json((tmp_path / "run" / "history.json").read_text())
    assert history[0]["val_loss"] is None and history[0]["loss"] > 0
    assert _strict_json((tmp_path / "run" / "model.json").read_text())["val_loss"] is None


def test_a_flipped_byte_in_the_weights_is_detected(tmp_path):
    import zipfile

    train(tiny_volumes(2), TrainConfig(**{**TINY, "epochs": 1}), tmp_path)
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path) as archive:
        weights = max(archive.infolist(), key=lambda info: info.file_size)  # the largest tensor
    data = bytearray(path.read_bytes())
    header = weights.header_offset
    start = header + 30 + int.from_bytes(data[header + 26:header + 28], "little") \
        + int.from_bytes(data[header + 28:header + 30], "little")
    data[start + weights.file_size // 2] ^= 0x10  # one bit of one weight
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a computer without CUDA")
def test_cuda_on_a_cpu_only_computer_is_not_called_a_corrupt_file(tmp_path):
    train(tiny_volumes(2), TrainConfig(**{**TINY, "epochs": 1}), tmp_path)
    with pytest.raises(FetalInpaintError, match="no CUDA GPU on this computer; choose device 'cpu'") as raised:
        load_checkpoint(tmp_path, device="cuda")
    assert not isinstance(raised.value, CheckpointError) and "corrupt" not in str(raised.value)


def test_command_line_evaluates_and_exports_in_the_volume_geometry(tmp_path, capsys):
    import SimpleITK as sitk

    from FetalInpaintLib.__main__ import main

    train(tiny_volumes(2), TrainConfig(**{**TINY, "epochs": 1}), tmp_path / "run")
    volume = _write_volume_file(tmp_path / "held_out.nrrd", seed=5)
    assert main(["evaluate", "--model", str(tmp_path / "run"), "--volumes", volume, "--seeds", "0",
                 "--max-patches", "4", "--json"]) == 0
    rows = _strict_json(capsys.readouterr().out)
    assert {row["method"] for row in rows} == {"model", "mean", "biharmonic"}

    output = tmp_path / "features.nrrd"
    assert main(["export", "--model", str(tmp_path / "run" / "model.pt"), "--volume", volume, "--output", str(output),
                 "--pca", "3"]) == 0
    features, source = sitk.ReadImage(str(output)), sitk.ReadImage(volume)
    assert features.GetNumberOfComponentsPerPixel() == 3 and features.GetSize() == source.GetSize()
    assert features.GetSpacing() == source.GetSpacing() and features.GetDirection() == source.GetDirection()
    assert main(["export", "--model", str(tmp_path / "missing.pt"), "--volume", volume, "--output", str(output)]) == 2
    assert "not found" in capsys.readouterr().err


TINY_OPTIONS = ["--device", "cpu", "--base-channels", "4", "--depth", "2", "--patch-size", "16", "--stride", "8",
                "--batch-size", "16", "--threads", "1"]


def test_command_line_replaces_an_earlier_training_only_when_told(tmp_path, capsys):
    volume, run = _write_volume_file(tmp_path / "only.nrrd"), tmp_path / "run"
    assert train_main(["--volumes", volume, "--out", str(run), "--epochs", "1", *TINY_OPTIONS]) == 0
    earlier = {path.name: path.read_bytes() for path in run.iterdir()}
    assert {"model.pt", "resume.pt", "history.json"} <= set(earlier)

    assert train_main(["--volumes", volume, "--out", str(run), "--epochs", "1", *TINY_OPTIONS]) == 2
    assert "give --resume to continue it, --overwrite to replace it, or another --out" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in run.iterdir()} == earlier

    # A replacing run stopped in its first epoch leaves its own model and resume point, nothing of the earlier run.
    request_stop(run)
    assert train_main(["--volumes", volume, "--out", str(run), "--epochs", "2", "--overwrite", *TINY_OPTIONS]) == 0
    assert _strict_json(capsys.readouterr().out.splitlines()[-1])["interrupted"]
    assert sorted(path.name for path in run.iterdir()) == ["model.json", "model.pt", "resume.pt"]
    assert json.loads((run / "model.json").read_text())["config"]["epochs"] == 2
    assert train_main(["--volumes", volume, "--out", str(run), "--epochs", "2", "--resume", *TINY_OPTIONS]) == 0
    assert len(_strict_json((run / "history.json").read_text())) == 2


def test_command_line_trains_on_a_2d_image_and_exports_2d_features_in_its_geometry(tmp_path, capsys):
    import SimpleITK as sitk

    from FetalInpaintLib.__main__ import main

    image = sitk.GetImageFromArray(phantom((1, 40, 48))[0])  # one ultrasound frame or MRI slice
    image.SetSpacing((0.2, 0.3))
    image.SetOrigin((5.0, -7.0))
    sitk.WriteImage(image, str(tmp_path / "frame.nrrd"))
    frame = str(tmp_path / "frame.nrrd")
    assert train_main(["--volumes", frame, "--out", str(tmp_path / "run"), "--epochs", "1", *TINY_OPTIONS]) == 0
    assert main(["export", "--model", str(tmp_path / "run"), "--volume", frame, "--output",
                 str(tmp_path / "features.nrrd"), "--pca", "2"]) == 0
    features = sitk.ReadImage(str(tmp_path / "features.nrrd"))
    assert features.GetDimension() == 2 and features.GetNumberOfComponentsPerPixel() == 2
    assert (features.GetSize(), features.GetSpacing(), features.GetOrigin()) == ((48, 40), (0.2, 0.3), (5.0, -7.0))
