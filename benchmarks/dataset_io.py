"""Writing and loading a demonstration dataset (LeRobot v3.0, PNG frames), and reading samples from it in training.

Writes a synthetic dataset shaped like `capvector demos` output (two cameras, RGB and depth, blocky images that
compress about like rendered ones), then times: writing it (PNG encoding, statistics), loading it into memory with
and without depth (the one-time PNG decoding), and drawing training samples (in-memory indexing, what each training
step pays). The frames of the synthetic dataset are not simulator frames, so compare runs of this script, not its
numbers with `capvector demos` timings.

    python benchmarks/dataset_io.py [--frames N] [--image-size S]
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from capvector.bench.env.dataset import DemoDataset
from capvector.bench.env.demos import frame_features
from capvector.bench.env.lerobot_format import Episode, write_dataset


def blocky(rng: np.random.Generator, shape: tuple[int, ...], block: int, high: int, dtype: type) -> np.ndarray:
    """Random values constant over block x block pixels, plus a little noise."""
    *lead, height, width = shape
    coarse = rng.integers(0, high, (*lead, height // block, width // block))
    fine = np.kron(coarse, np.ones((block, block), dtype=coarse.dtype))
    return np.clip(fine + rng.integers(0, 3, fine.shape), 0, high - 1).astype(dtype)


def episodes(frames: int, size: int, length: int = 100) -> list[Episode]:
    rng = np.random.default_rng(0)
    out = []
    for start in range(0, frames, length):
        n = min(length, frames - start)
        data = {
            f"observation.images.{c}": blocky(rng, (n, 3, size, size), 4, 256, np.uint8) for c in ("scene", "wrist")
        }
        data |= {
            f"observation.depth.{c}": blocky(rng, (n, 1, size, size), 4, 3000, np.uint16) for c in ("scene", "wrist")
        }
        data |= {k: rng.normal(size=(n, d)).astype(np.float32) for k, d in [("observation.state", 4), ("action", 4)]}
        data |= {"observation.privileged": rng.normal(size=(n, 6)).astype(np.float32)}
        data |= {key: np.arange(n) == n - 1 for key in ("next.success", "next.done")}
        out.append(Episode(f"task {start // length % 4}", data))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=5000, help="training samples drawn for the per-sample time")
    args = parser.parse_args()
    data = episodes(args.frames, args.image_size)
    folder = Path(tempfile.mkdtemp())
    try:
        start = time.perf_counter()
        write_dataset(folder / "ds", data, frame_features(args.image_size), fps=80)
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        with_depth = DemoDataset(folder / "ds", depth=True)
        load_depth_s = time.perf_counter() - start
        start = time.perf_counter()
        DemoDataset(folder / "ds", depth=False)
        load_s = time.perf_counter() - start
        order = np.random.default_rng(0).integers(0, len(with_depth), args.samples)
        start = time.perf_counter()
        for i in order:
            with_depth[int(i)]
        sample_us = (time.perf_counter() - start) / args.samples * 1e6
        megabytes = sum(p.stat().st_size for p in (folder / "ds").rglob("*") if p.is_file()) / 2**20
    finally:
        shutil.rmtree(folder)
    print(
        f"RESULT frames={args.frames} image_size={args.image_size} write_s={write_s:.2f} "
        f"load_depth_s={load_depth_s:.2f} load_s={load_s:.2f} ms_per_frame={1000 * load_depth_s / args.frames:.3f} "
        f"sample_us={sample_us:.1f} size_mb={megabytes:.1f}"
    )


if __name__ == "__main__":
    main()
