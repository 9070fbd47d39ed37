"""Peak memory of loading large photos and of training on more images than fit in memory.

1. Large photos: generates PHOTOS photo-like images (smooth colour patterns) of WIDTH x HEIGHT
   as JPEG files in an image-folder tree, and the same images shrunk to the side the loader
   stores (256 px), loads each tree with `data.load_dataset` in a fresh process, and reports
   the process's peak resident memory (ru_maxrss). The loader decodes, converts and resizes
   one image at a time, so both peaks should be close (target: within 1.3 times).
2. With --stream N: generates N images of SIDE x SIDE (JPEG, ten classes; a tenth for the test
   set) and runs the main job on them (`--image-size 32 --epochs 1`) in a fresh process: the
   decoded images (N x SIDE x SIDE x 3 bytes) exceed the memory budget, stay on disk and are
   read a batch at a time; reports that process's peak resident memory (target: below 8 GB
   for 100,000 images at 224 px, 15 GB of images).

    python src/benchmark_memory.py                        # 720 photos of 1600x1200
    python src/benchmark_memory.py --photos 0 --stream 100000 --side 224 --weights PATH

Prints a table and writes it as JSON to out/benchmarks/.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vgg_transfer import paths

PHOTOS = 720
WIDTH, HEIGHT = 1600, 1200
STORED_SIDE = 256  # data.MAX_STORED_IMAGE_SIDE: what the loader keeps of a large photo

PEAK = """
import resource, sys
from vgg_transfer import data
dataset = data.load_dataset(sys.argv[1], cache_dir=sys.argv[2], verbose=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, len(dataset.y_train) + len(dataset.y_val))
"""


def photo(rng, width, height):
    """A smooth colour pattern of width x height, like a photo for the decoder's purposes."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [127 + 120 * np.sin(x / rng.uniform(40, 200) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(40, 200))
                for _ in range(3)]
    return Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))


def write_trees(root, photos, width, height):
    """ROOT/large and ROOT/small image-folder trees of the same photos (two classes, 5/6 train)."""
    rng = np.random.default_rng(0)
    scale = STORED_SIDE / max(width, height)
    for index in range(photos):
        split = "test" if index % 6 == 5 else "train"
        image = photo(rng, width, height)
        for tree, picture in (("large", image), ("small", image.resize((round(width * scale), round(height * scale))))):
            folder = root / tree / split / f"class{index % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            picture.save(folder / f"{index:06d}.jpg", quality=90)


def peak_memory(tree, cache_dir):
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run([sys.executable, "-c", PEAK, str(tree), str(cache_dir)], capture_output=True, text=True,
                            env=environment)
    if result.returncode != 0:
        sys.exit(f"loading {tree} failed:\n{result.stderr[-2000:]}")
    peak, images = map(int, result.stdout.split()[-2:])
    return peak, images


def write_many(root, count, side, classes=10):
    """`count` small random images, upscaled to `side` (quick to make), in an image-folder tree."""
    rng = np.random.default_rng(0)
    for index in range(count):
        split = "test" if (index // classes) % 10 == 9 else "train"  # a tenth of each class
        folder = root / split / f"class{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        pixels[..., index % 3] = 25 * (index % classes)  # something to learn
        Image.fromarray(pixels).resize((side, side), Image.Resampling.BILINEAR).save(folder / f"{index:07d}.jpg")


def streamed_main_job(root, images, side, weights, out):
    """Runs the main job on ROOT in a fresh process; returns (peak resident bytes of it, seconds)."""
    start = time.perf_counter()
    command = [sys.executable, str(Path(__file__).with_name("transfer_learning.py")), "--data", str(root),
               "--weights", weights, "--image-size", "32", "--epochs", "1", "--out", str(out), "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "VGG_TRANSFER_CACHE_DIR": str(root.parent / "cache-stream")})
    if result.returncode != 0:
        sys.exit(f"the main job failed:\n{result.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(result.stdout[-600:])
    return peak, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=PHOTOS)
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--height", type=int, default=HEIGHT)
    parser.add_argument("--stream", type=int, default=0, metavar="N", help="images for the streaming run (0: none)")
    parser.add_argument("--side", type=int, default=224, help="their side in pixels")
    parser.add_argument("--weights", default="imagenet", help="for the streaming run's main job")
    parser.add_argument("--scratch", default=None, help="where to write the images (default: a temporary folder)")
    parser.add_argument("--out", default=str(paths.out_dir()))
    options = parser.parse_args()
    result = {}
    if options.stream:
        with tempfile.TemporaryDirectory(prefix="vgg-transfer-stream-", dir=options.scratch) as scratch:
            root = Path(scratch) / "images"
            start = time.perf_counter()
            write_many(root, options.stream, options.side)
            print(f"Wrote {options.stream} images of {options.side}x{options.side} in {time.perf_counter() - start:.0f} s")
            peak, seconds = streamed_main_job(root, options.stream, options.side, options.weights, Path(scratch) / "out")
        result["stream"] = {"images": options.stream, "side": options.side, "peak_bytes": peak,
                            "seconds": round(seconds), "decoded_bytes": options.stream * options.side ** 2 * 3}
        print(f"| {options.stream:,} images of {options.side}x{options.side} ({result['stream']['decoded_bytes'] / 2**30:.1f} "
              f"GiB decoded) | main job, 1 epoch | peak memory {peak / 2**30:.2f} GiB | {seconds:.0f} s |")
    if not options.photos:
        return _write(result, options.out)
    with tempfile.TemporaryDirectory(prefix="vgg-transfer-memory-", dir=options.scratch) as scratch:
        root = Path(scratch)
        start = time.perf_counter()
        write_trees(root, options.photos, options.width, options.height)
        print(f"Wrote {options.photos} photos of {options.width}x{options.height} and their shrunk copies in "
              f"{time.perf_counter() - start:.0f} s")
        rows = {}
        for tree in ("large", "small"):
            start = time.perf_counter()
            peak, images = peak_memory(root / tree, root / f"cache-{tree}")
            rows[tree] = {"peak_bytes": peak, "seconds": round(time.perf_counter() - start, 1), "images": images}
    ratio = rows["large"]["peak_bytes"] / rows["small"]["peak_bytes"]
    print(f"\n| photos | stored | peak memory | loading time |\n|---|---|---|---|")
    for tree, row in rows.items():
        size = f"{options.width}x{options.height}" if tree == "large" else f"shrunk to {STORED_SIDE} px"
        print(f"| {options.photos} of {size} | {STORED_SIDE} px | {row['peak_bytes'] / 2**30:.2f} GiB | "
              f"{row['seconds']} s |")
    print(f"\nLarge photos' peak over the shrunk ones': {ratio:.2f}x (target: at most 1.3x)")
    result["photos"] = {"photos": options.photos, "size": [options.width, options.height], "rows": rows, "ratio": ratio}
    _write(result, options.out)


def _write(result, out):
    report = Path(out) / "benchmarks" / f"memory-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(result, indent=2))
    print(f"Written: {report}")


if __name__ == "__main__":
    main()
