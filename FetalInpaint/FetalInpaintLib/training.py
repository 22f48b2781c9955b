"""Training loop: AdamW + cosine schedule, corruption on the device, checkpoints, resume, early stop.

Files written to ``output_dir`` (only by rank 0 under DistributedDataParallel):

- ``model.pt``: state dict of the best model (lowest validation loss), load with
  :func:`load_checkpoint` (``torch.load(weights_only=True)``);
- ``model.json``: architecture, patch size, normalisation, corruptor, split hash, versions;
- ``resume.pt``: model, optimiser and scheduler state of the last completed step, to resume;
- ``history.json`` and ``loss_curve.png``.

A new (not resumed) training first removes these files of an earlier one, so none of them outlives it.
"""

import dataclasses
import gc
import json
import math
import os
import platform
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import __version__
from .config import OUTPUT_FILE_NAMES, TrainConfig  # noqa: F401  (TrainConfig re-exported: the settings of train())
from .control import TrainingLock, clear_stop_request, stop_requested
from .corruptors import corrupt_batch
from .data import PatchDataset, check_volume, split_by_volume, volume_patches
from .errors import ArchitectureMismatchError, CheckpointError, FetalInpaintError, InvalidVolumeError
from .model import build_model

CHECKPOINT_FORMAT = 1
SLICE_AXIS_RULE = "the axis of length 1 of a single image; else largest spacing (acquisition axis); isotropic volumes: array axis 0"


@dataclass
class TrainResult:
    """Outcome of :func:`train`."""

    output_dir: str
    checkpoint_path: str
    metadata_path: str
    loss_curve_path: str
    history: list
    best_val_loss: float
    epochs_completed: int
    steps: int
    patches_per_s: float
    stopped_early: bool
    interrupted: bool


def resolve_device(device="auto"):
    """``torch.device`` for "auto" (CUDA if available), "cpu", "cuda" or "cuda:N"."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FetalInpaintError(
            f"device {device!r} requested but PyTorch finds no CUDA GPU on this computer; choose device 'cpu' "
            "(or 'auto')."
        )
    return resolved


def library_versions():
    """Versions recorded in checkpoint metadata."""
    return {
        "FetalInpaintLib": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _named_volumes(volumes):
    """[(id, array, spacing)] from a dict id -> array | (array, spacing), or a sequence of those."""
    if volumes is None or len(volumes) == 0:
        raise InvalidVolumeError("no volume given: training needs at least one image volume.")
    items = volumes.items() if isinstance(volumes, dict) else ((f"volume_{i}", v) for i, v in enumerate(volumes))
    named = []
    for name, item in items:
        array, spacing = item if isinstance(item, tuple) else (item, (1.0, 1.0, 1.0))
        named.append((str(name), check_volume(array, name=f"volume {name!r}"), tuple(float(s) for s in spacing)))
    return named


def _patches_of(named, ids, config):
    chosen = [(array, spacing) for name, array, spacing in named if name in ids]
    parts = [
        volume_patches(array, spacing, config.patch_size, config.stride, config.percentiles, config.min_foreground)[0]
        for array, spacing in chosen
    ]
    patches = np.concatenate(parts) if parts else np.zeros((0, config.patch_size, config.patch_size), np.float32)
    return patches


def _augment(x, generator):
    """Random per-patch horizontal/vertical flips and transposes (all on the device)."""
    flips = torch.rand((3, x.shape[0], 1, 1, 1), generator=generator, device=x.device) < 0.5
    x = torch.where(flips[0], x.flip(-1), x)
    x = torch.where(flips[1], x.flip(-2), x)
    return torch.where(flips[2], x.transpose(-1, -2), x)


def masked_l2(prediction, target, mask, whole_image_weight=0.0):
    """Mean squared error over hidden pixels, plus ``whole_image_weight`` x the whole-image MSE."""
    squared = (prediction.float() - target.float()) ** 2
    maskf = mask.float()
    loss = (squared * maskf).sum() / maskf.sum().clamp(min=1.0)
    if whole_image_weight:
        loss = loss + whole_image_weight * squared.mean()
    return loss


def _device_generator(device, seed):
    return torch.Generator(device=device).manual_seed(int(seed))


def _autocast(device):
    # bf16 autocast on CUDA only: on CPU it is slower than float32 for these convolutions.
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def evaluate_loss(model, patches, config, device, seed=12345, batch_size=128):
    """Hidden-region L2 of ``model`` on fixed (seeded) corruptions of ``patches``."""
    if len(patches) == 0:
        return float("nan")
    generator = _device_generator(device, seed)
    model.eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(patches), batch_size):
            x = torch.as_tensor(patches[start : start + batch_size]).unsqueeze(1).to(device)
            corrupted, mask = corrupt_batch(x, config.corruptor, config.strength, generator=generator, **config.corruptor_params)
            if config.channels_last:
                corrupted = corrupted.contiguous(memory_format=torch.channels_last)
            with _autocast(device):
                prediction, _ = _unwrap(model).inpaint(corrupted, mask)
            squared = (prediction.float() - x) ** 2
            total += float((squared * mask).sum())
            count += float(mask.sum())
    model.train()
    return total / max(count, 1.0)


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _atomic_save(obj, path):
    """torch.save to a temporary file then rename, so an interruption never leaves a torn file."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def finite_or_none(value):
    """A float for JSON: None where it is NaN or infinite (strict JSON has neither)."""
    return value if value is None or math.isfinite(value) else None


def _write_json(data, path):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, allow_nan=False)
    os.replace(tmp, path)


def plot_loss_curve(history, path):
    """PNG of training and validation loss per epoch (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3.5), dpi=100)
    axes = figure.add_subplot()
    epochs = [h["epoch"] for h in history]
    axes.plot(epochs, [h["loss"] for h in history], "o-", label="train")
    if any(h.get("val_loss") is not None for h in history):
        axes.plot(epochs, [math.nan if h.get("val_loss") is None else h["val_loss"] for h in history], "s-",
                  label="validation")
    axes.set_xlabel("epoch")
    axes.set_ylabel("hidden-region L2")
    axes.set_yscale("log")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return str(path)


def _metadata(config, split, epoch, val_loss, patches_per_s):
    train_ids, val_ids, split_digest = split
    return {
        "format": CHECKPOINT_FORMAT,
        "architecture": config.architecture(),
        "patch_size": config.patch_size,
        "stride": config.stride,
        "normalization": {"method": "percentile", "percentiles": list(config.percentiles), "range": [0.0, 1.0]},
        "slice_axis": SLICE_AXIS_RULE,
        "corruptor": {"name": config.corruptor, "strength": config.strength, **config.corruptor_params},
        "split": {"hash": split_digest, "train": train_ids, "val": val_ids},
        "epoch": epoch,
        "val_loss": val_loss,
        "patches_per_s": patches_per_s,
        "config": dataclasses.asdict(config),
        "versions": library_versions(),
    }


def train(volumes, config, output_dir, progress=None, should_stop=None, resume=False):
    """Train an inpainting autoencoder on the slices of ``volumes``.

    Parameters
    ----------
    volumes : dict or sequence
        ``{id: array}`` / ``{id: (array, spacing)}`` or a sequence of arrays / ``(array, spacing)``
        (ids ``volume_0``...). Arrays are (z, y, x); spacing in mm, z, y, x order (default
        isotropic 1 mm, sliced along axis 0).
    config : TrainConfig
    output_dir : str or Path
    progress : callable or None
        Called every ``config.log_every`` steps and after each epoch with a dict (``epoch``,
        ``step``, ``loss``, ``val_loss``, ``patches_per_s``, ``eta_s``); returning True requests a
        stop: the state is checkpointed and training returns with ``interrupted=True``.
    should_stop : callable or None
        Polled every step; True has the same effect as progress returning True. A stop file in
        ``output_dir`` (:func:`FetalInpaintLib.control.request_stop`) has the same effect too; it
        is removed when training returns.
    resume : bool, default False
        Continue from ``output_dir/resume.pt`` when it exists (same split and architecture).
        Otherwise the files of an earlier training in ``output_dir`` are removed once the volumes
        have given their patches (the command line refuses that unless told, see
        :func:`FetalInpaintLib.train.check_output_folder`).

    Returns
    -------
    TrainResult

    Raises
    ------
    TrainingLockedError
        Another live training holds the lock of ``output_dir`` (see :mod:`FetalInpaintLib.control`).
    """
    config.validate()
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = resolve_device(config.device)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    output_dir = Path(output_dir)

    def stop_wanted():
        return stop_requested(output_dir) or bool(should_stop and should_stop())

    try:
        if rank != 0:
            return _train(volumes, config, output_dir, progress, stop_wanted, resume, device, distributed, rank, world)
        output_dir.mkdir(parents=True, exist_ok=True)
        with TrainingLock(output_dir):
            try:
                return _train(volumes, config, output_dir, progress, stop_wanted, resume, device, distributed, rank,
                              world)
            finally:
                clear_stop_request(output_dir)
    finally:
        if distributed:
            # The DistributedDataParallel wrapper holds the process group in a reference cycle.
            # Collected only at the interpreter's exit, after destroy_process_group, its gloo
            # threads are destroyed unjoined and abort the process ("terminate called without an
            # active exception").
            gc.collect()


def _train(volumes, config, output_dir, progress, should_stop, resume, device, distributed, rank, world):
    """The body of :func:`train`, run while rank 0 holds the output folder's lock."""
    named = _named_volumes(volumes)
    split = split_by_volume([name for name, _, _ in named], config.val_fraction, config.seed)
    train_patches = _patches_of(named, set(split[0]), config)
    val_patches = _patches_of(named, set(split[1]), config)
    if len(train_patches) == 0:
        raise InvalidVolumeError(
            "the training volumes give no patch with enough foreground; lower min_foreground or the patch size."
        )
    val_patches = val_patches[np.random.default_rng(config.seed).permutation(len(val_patches))[: config.max_val_patches]]
    dataset = PatchDataset(train_patches)

    torch.manual_seed(config.seed)
    model = build_model(config.architecture()).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    per_epoch = min(len(dataset), config.patches_per_epoch or len(dataset))
    steps_per_epoch = max(1, math.ceil(per_epoch / (config.batch_size * world)))
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )

    history, best_val, bad_epochs, start_epoch, step = [], float("inf"), 0, 0, 0
    resume_path = output_dir / "resume.pt"
    if resume and resume_path.exists():
        state = _load_state(resume_path, device)
        if state["split_hash"] != split[2] or state["architecture"] != config.architecture():
            raise FetalInpaintError(
                f"{resume_path} belongs to a run with another split or architecture; "
                "use the same volumes and settings, or another output folder, or resume=False."
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best_val, bad_epochs = list(state["history"]), state["best_val"], state["bad_epochs"]
        start_epoch, step = state["next_epoch"], state["step"]
    elif rank == 0:  # a new training: an interrupted one must not leave the earlier model beside its resume point
        for name in OUTPUT_FILE_NAMES:
            (output_dir / name).unlink(missing_ok=True)

    net = model
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net)

    def save_state(next_epoch):
        if rank == 0:
            _atomic_save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "history": history,
                    "best_val": best_val,
                    "bad_epochs": bad_epochs,
                    "next_epoch": next_epoch,
                    "step": step,
                    "split_hash": split[2],
                    "architecture": config.architecture(),
                },
                resume_path,
            )

    def save_model(epoch, val_loss, speed):
        if rank == 0:
            _atomic_save(model.state_dict(), output_dir / "model.pt")
            _write_json(_metadata(config, split, epoch, val_loss, speed), output_dir / "model.json")

    def stop_requested(report):
        wanted = bool(should_stop and should_stop()) or bool(progress and report is not None and progress(report))
        if distributed:  # every rank must leave the loop at the same step
            flag = torch.tensor([float(wanted)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            wanted = bool(flag.item())
        return wanted

    net.train()
    train_time, trained, run_steps, interrupted, stopped_early = 0.0, 0, 0, False, False
    speed = 0.0
    epoch = start_epoch
    for epoch in range(start_epoch, config.epochs):
        if step >= total_steps:
            break
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
        subset = torch.utils.data.Subset(dataset, order[:per_epoch].tolist())
        sampler = (
            torch.utils.data.DistributedSampler(subset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed)
            if distributed
            else torch.utils.data.SequentialSampler(subset)  # already shuffled by ``order``
        )
        if distributed:
            sampler.set_epoch(epoch)
        batches = torch.utils.data.BatchSampler(sampler, config.batch_size, drop_last=False)
        generator = _device_generator(device, (config.seed * 1000 + epoch) * 64 + rank)
        epoch_loss, epoch_batches, epoch_start_step = 0.0, 0, step
        for batch_indices in batches:
            started = time.perf_counter()
            x = dataset.patches[order[:per_epoch][batch_indices]].to(device, non_blocking=True)
            if config.augment:
                x = _augment(x, generator)
            corrupted, mask = corrupt_batch(x, config.corruptor, config.strength, generator=generator, **config.corruptor_params)
            inputs = torch.cat([corrupted, mask.to(corrupted.dtype)], dim=1) if config.in_channels == 2 else corrupted
            if config.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with _autocast(device):
                prediction = net(inputs)
            loss = masked_l2(prediction, x, mask, config.whole_image_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            run_steps += 1
            loss_value = float(loss.detach())
            epoch_loss += loss_value
            epoch_batches += 1
            train_time += time.perf_counter() - started
            trained += x.shape[0] * world
            speed = trained / max(train_time, 1e-9)
            report = None
            if progress and step % config.log_every == 0:
                report = {
                    "epoch": epoch,
                    "step": step,
                    "loss": loss_value,
                    "val_loss": history[-1]["val_loss"] if history else None,
                    "patches_per_s": speed,
                    "eta_s": (total_steps - step) * train_time / max(run_steps, 1),
                }
            if stop_requested(report):
                interrupted = True
                break
            if step >= total_steps:
                break
        if interrupted:
            # Keep the mid-epoch weights but count the epoch as not done: resume redoes it in full.
            step = epoch_start_step
            scheduler.last_epoch = step
            save_state(epoch)
            if rank == 0 and not (output_dir / "model.pt").exists():
                save_model(epoch, None, speed)
            break

        # None without validation volumes: history.json and model.json stay strict JSON (no NaN).
        val_loss = finite_or_none(evaluate_loss(model, val_patches, config, device)) if len(val_patches) else None
        train_loss = epoch_loss / max(epoch_batches, 1)
        monitored = train_loss if val_loss is None else val_loss
        history.append({"epoch": epoch, "step": step, "loss": finite_or_none(train_loss), "val_loss": val_loss,
                        "patches_per_s": speed})
        if monitored < best_val:
            best_val, bad_epochs = monitored, 0
            save_model(epoch, val_loss, speed)
        else:
            bad_epochs += 1
        save_state(epoch + 1)
        if rank == 0:
            _write_json(history, output_dir / "history.json")
            plot_loss_curve(history, output_dir / "loss_curve.png")
        epoch_report = {"epoch": epoch, "step": step, "loss": train_loss, "val_loss": val_loss, "patches_per_s": speed,
                        "eta_s": (total_steps - step) * train_time / max(run_steps, 1)}
        # The epoch's state is saved: a resume starts the next one. After the last, the training is done anyway.
        if stop_requested(epoch_report if rank == 0 else None) and epoch + 1 < config.epochs and step < total_steps:
            interrupted = True
            break
        if config.patience and bad_epochs >= config.patience:
            stopped_early = True
            break
    if distributed:
        dist.barrier()
    return TrainResult(
        output_dir=str(output_dir),
        checkpoint_path=str(output_dir / "model.pt"),
        metadata_path=str(output_dir / "model.json"),
        loss_curve_path=str(output_dir / "loss_curve.png"),
        history=history,
        best_val_loss=best_val,
        epochs_completed=len(history),
        steps=step,
        patches_per_s=speed,
        stopped_early=stopped_early,
        interrupted=interrupted,
    )


def _load_state(path, device):
    corrupt = ("the file is corrupt or not a FetalInpaint checkpoint: copy it again from where it came from, or "
               "train again (resume=False)")
    # torch.load does not check the CRCs of the zip archive it reads: a changed byte would load as a changed weight.
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"cannot read {path} ({type(error).__name__}: {error}); {corrupt}.") from error
    if damaged is not None:
        raise CheckpointError(f"{path} is damaged (checksum error in its part {damaged!r}); {corrupt}.")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch raises many types for torn or foreign files
        raise CheckpointError(f"cannot read {path} ({type(error).__name__}: {error}); {corrupt}.") from error


def load_checkpoint(path, device="cpu", architecture=None):
    """Load a trained model and its metadata.

    Parameters
    ----------
    path : str or Path
        ``model.pt`` (its ``model.json`` must sit next to it) or the training output folder.
    device : str, default "cpu"
        "cuda" needs a CUDA GPU (an error says to choose "cpu" where there is none).
    architecture : dict or None
        If given, the checkpoint must have exactly this architecture.

    Returns
    -------
    model : InpaintingAutoencoder
        In eval mode on ``device``.
    metadata : dict

    Raises
    ------
    FetalInpaintError
        ``device`` is a CUDA device and PyTorch finds no CUDA GPU.
    CheckpointError
        Missing, unreadable or corrupt file (checked against the zip archive's checksums) or metadata.
    ArchitectureMismatchError
        The weights do not fit the declared (or the requested) architecture.
    """
    device = resolve_device(device)  # before reading: no CUDA is not a corrupt file
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    meta_path = path.with_suffix(".json")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found; train a model first or choose an existing model.pt.")
    if not meta_path.exists():
        raise CheckpointError(f"metadata {meta_path} not found; a FetalInpaint checkpoint is a model.pt with its model.json.")
    try:
        with open(meta_path) as handle:
            metadata = json.load(handle)
        declared = metadata["architecture"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"metadata {meta_path} is corrupt ({error}); re-export or retrain the model.") from error
    if architecture is not None and dict(architecture) != declared:
        raise ArchitectureMismatchError(
            f"checkpoint {path} is a {declared} model, but {dict(architecture)} was requested; "
            "load it without `architecture` or pick a matching checkpoint."
        )
    state = _load_state(path, device)
    try:
        model = build_model(declared)
    except (TypeError, ValueError) as error:
        raise ArchitectureMismatchError(f"checkpoint {path} declares an unknown architecture {declared}: {error}") from error
    try:
        model.load_state_dict(state)
    except (RuntimeError, AttributeError, TypeError) as error:
        raise ArchitectureMismatchError(
            f"weights in {path} do not fit the architecture {declared} in its metadata; the files come "
            f"from different models: retrain or pick the matching model.json ({str(error)[:200]})."
        ) from error
    return model.to(device).eval(), metadata
