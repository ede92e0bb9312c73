"""Loader throughput: frames decoded, transformed (resize, flip, random erasing, normalisation) and
batched per second, with 2 worker processes against loading in the main process (the baseline).

Frames on disk are synthetic MARS-layout datasets at the network input size: 128 x 64 (the CPU
preset, the default synthetic dataset) and 256 x 128 (MARS's crops, the papers' input).  Each timed
call reads ``BATCHES`` batches of 16 clips x 8 frames from a loader whose workers persist between
calls.  The frames per second of each case are printed and stored in the benchmark's extra_info.
``KEYPOINTOPS_BENCH_SMALL=1`` shrinks the datasets and the number of batches.
"""
import pytest
from conftest import SMALL

from keypointops.data import MARS, build_loader
from keypointops.data.synthetic import generate

CLIPS, FRAMES = 16, 8
BATCHES = 2 if SMALL else 12
SIZES = [(128, 64), (256, 128)]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    out = {}
    for size in SIZES:
        root = tmp_path_factory.mktemp(f"synthetic{size[0]}")
        generate(root, num_train_ids=6 if SMALL else 24, num_test_ids=2, frames=16, size=size, progress=False)
        out[size] = MARS(root).train
    return out


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_loader_throughput(measure, benchmark, datasets, size, workers):
    loader = build_loader(datasets[size], train=True, frames=FRAMES, sampling="restricted_random", height=size[0],
                          width=size[1], batch_size=CLIPS, instances=4, workers=workers, seed=0)
    batches = min(BATCHES, len(loader))
    epoch = iter(range(1000))

    def run():
        loader.batch_sampler.set_epoch(next(epoch))
        for i, _ in zip(range(batches), loader):
            pass

    measure(run, group=f"data loader {size[0]}x{size[1]}, {CLIPS}x{FRAMES} frames/batch",
            impl=f"workers={workers}", device="cpu", baseline=workers == 0)
    if benchmark.disabled:  # smoke run (--benchmark-disable): nothing was timed
        return
    frames_per_s = batches * CLIPS * FRAMES / benchmark.stats.stats.median
    benchmark.extra_info["frames_per_s"] = frames_per_s
    print(f"\nloader {size[0]}x{size[1]} workers={workers}: {frames_per_s:.0f} frames/s")
