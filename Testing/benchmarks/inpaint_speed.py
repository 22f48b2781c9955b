"""Training throughput and whole-stack encoding time of inpainting architectures on this machine.

For each (base_channels, depth, patch_size) it times full training steps (corruption on the
device, forward, masked L2, backward, AdamW) on random patches, and encoding of a 320x320x22
stack (22 whole slices). Random data: the timing does not depend on the content.

Usage (from the repository root)::

    .venv/bin/python Testing/benchmarks/inpaint_speed.py
    .venv/bin/python Testing/benchmarks/inpaint_speed.py --configs 32,4,48 16,4,48 --no-channels-last
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "FetalInpaint"))

from FetalInpaintLib.corruptors import corrupt_batch  # noqa: E402
from FetalInpaintLib.model import InpaintingAutoencoder  # noqa: E402
from FetalInpaintLib.training import masked_l2  # noqa: E402


def measure(base_channels, depth, patch_size, batch_size=64, steps=10, channels_last=True, device="cpu"):
    """(training patches/s, seconds to encode 22 slices of 320x320)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = InpaintingAutoencoder(base_channels, depth).to(device).to(memory_format=fmt)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    clean = torch.rand(batch_size, 1, patch_size, patch_size, device=device)
    for step in range(steps + 2):  # two warm-up steps (kernel selection)
        if step == 2:
            started = time.perf_counter()
        corrupted, mask = corrupt_batch(clean, "shapes", 0.2)
        inputs = torch.cat([corrupted, mask.float()], 1).contiguous(memory_format=fmt)
        loss = masked_l2(model(inputs), clean, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    throughput = batch_size * steps / (time.perf_counter() - started)
    model.eval()
    stack = torch.rand(22, 1, 320, 320, device=device).contiguous(memory_format=fmt)
    with torch.no_grad():
        model.encode(stack[:2])
        started = time.perf_counter()
        for start in range(0, 22, 4):
            model.encode(stack[start:start + 4])
    return throughput, time.perf_counter() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["32,4,48", "32,4,64", "16,4,48", "16,4,64", "32,3,48"],
                        help="base_channels,depth,patch_size triples")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-channels-last", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    print(f"load before: {os.getloadavg()}, threads {torch.get_num_threads()}")
    print("| base_channels | depth | patch | bottleneck | train patches/s | encode 320x320x22 (s) |")
    print("|---|---|---|---|---|---|")
    for spec in args.configs:
        base, depth, patch = (int(v) for v in spec.split(","))
        speed, encode = measure(base, depth, patch, steps=args.steps, channels_last=not args.no_channels_last)
        cells = patch // 2**depth
        print(f"| {base} | {depth} | {patch} | {cells}x{cells}x{base * 2**depth} | {speed:.1f} | {encode:.2f} |", flush=True)
    print(f"load after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
