"""How fast VGG16 runs here, in each precision the device offers, against what this device can
do in that precision: a throughput benchmark.

For each precision (PRECISIONS: by default every one the device computes natively, see
`devices.offered_precisions`: float32, and bfloat16 on a CPU with bfloat16 units; on an
NVIDIA GPU also float16 and bfloat16 by compute capability) and each IMAGE_SIZES entry it
measures images per second for VGG16 inference (the frozen feature extraction: the whole
convolutional base) and for training steps (base and a small head all trainable, as in
fine-tuning from block 1), on batches of raw uint8 32x32 images upscaled inside the model, as
the project's scripts feed them. From the counted FLOPs of the convolutions (a training step
counted as 3x the forward pass: the forward, and the gradients for activations and for
weights) it gives the achieved FLOP/s, and divides by the peak of that precision measured in
the same run: a large matrix product in its compute dtype. "Of peak" is so the share of what
the device can do in that precision. With --distribute the batches are split over every local
device and the peak is one device's times their number.

Random images and random weights: the speed does not depend on them, so --data and
--weights are not used. A table is printed and the figures are written as JSON to
out/benchmark/.

    python src/benchmark.py                                   # every precision this machine offers
    python src/benchmark.py --image-sizes 32,64 --precisions float32
    KERAS_BACKEND=jax python src/benchmark.py --batch-size 256   # a GPU
"""

import json
import sys
import time
from pathlib import Path

# The project's package first: it loads Keras without TensorFlow's start-up lines.
from vgg_transfer import cli, devices, distribute, models, runs
from vgg_transfer.errors import InputError

import keras
import numpy as np

IMAGE_SIZES = "32,64,224"
PRECISIONS = "offered"  # "offered" (every precision the device computes natively) or a list, e.g. float32,bfloat16
BATCH_SIZE = 64
MIN_SECONDS = 3.0  # each figure times whole batches for at least this long, after a warm-up
MATMUL_SIZE = 4096  # side of the square matrices whose product measures the peak
SEED = 42
CIFAR10_IMAGE_SHAPE = (32, 32, 3)  # what the model takes in, upscaled inside it


def parse_precisions(text):
    if text == "offered":
        return devices.offered_precisions()
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in chosen if name not in devices.DTYPE_POLICIES]
    if not chosen or unknown:
        raise InputError(f"--precisions {text!r}: pass 'offered' or some of {', '.join(devices.DTYPE_POLICIES)}, "
                         f"comma-separated")
    return chosen


def parse_sizes(text):
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(size < models.MIN_IMAGE_SIZE for size in sizes):
        raise InputError(f"--image-sizes {text!r}: pass comma-separated sizes of at least "
                         f"{models.MIN_IMAGE_SIZE}, e.g. 32,64,224")
    return sizes


def build_model(image_size):
    """uint8 32x32 images -> VGG16 preprocessing and resizing -> VGG16 base -> pooled softmax head."""
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
    inputs = keras.Input(shape=CIFAR10_IMAGE_SHAPE, dtype="uint8", name="image")
    x = base(models.vgg16_preprocessing(CIFAR10_IMAGE_SHAPE, image_size)(inputs))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"vgg16_{image_size}px"), base


def forward_flops(base):
    """FLOPs of one image's forward pass through the base's convolutions (2 per multiply-add)."""
    flops = 0
    for layer in base.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, _ = layer.output.shape
            flops += 2 * height * width * int(np.prod(layer.kernel.shape))
    return flops


def images_per_second(step, batch_size, min_seconds):
    """Runs `step(n_batches)` once to warm up (compilation), then long enough to time it."""
    step(1)
    start = time.perf_counter()
    step(1)
    one_batch = time.perf_counter() - start
    n_batches = max(1, int(np.ceil(min_seconds / max(one_batch, 1e-6))))
    start = time.perf_counter()
    step(n_batches)
    return n_batches * batch_size / (time.perf_counter() - start)


def measure(precision, sizes, rng):
    """{"precision", "matmul_tflops", "results": [a row per image size]} for one precision."""
    devices.set_precision(precision)
    # One device's product; with --distribute, the devices together can do that many times as much.
    peak = devices.matmul_peak(MATMUL_SIZE, MIN_SECONDS) * distribute.replicas()
    print(f"{precision}: peak {peak / 1e12:.2f} TFLOP/s ({MATMUL_SIZE}x{MATMUL_SIZE} matrix product"
          f"{f', one device times {distribute.replicas()}' if distribute.replicas() > 1 else ''})", flush=True)
    rows = []
    for size in sizes:
        devices.set_precision(precision)  # again: clear_session (below) resets Keras's dtype policy
        model, base = build_model(size)
        flops = forward_flops(base)
        batch = BATCH_SIZE
        images = rng.integers(0, 256, (batch, *CIFAR10_IMAGE_SHAPE), dtype=np.uint8)
        labels = rng.integers(0, 10, batch)

        def inference(n_batches):
            model.predict(np.concatenate([images] * n_batches), batch_size=batch, verbose=0)

        model.compile(optimizer=keras.optimizers.Adam(1e-5), loss="sparse_categorical_crossentropy")

        def training(n_batches):
            model.fit(np.concatenate([images] * n_batches), np.concatenate([labels] * n_batches),
                      batch_size=batch, epochs=1, shuffle=False, verbose=0)

        row = {"image_size": size, "dtype_policy": model.dtype_policy.name, "forward_gflops_per_image": flops / 1e9}
        for name, step, flops_per_image in (("inference", inference, flops), ("training", training, 3 * flops)):
            rate = images_per_second(step, batch, MIN_SECONDS)
            row[name] = {
                "images_per_second": rate,
                "tflops": rate * flops_per_image / 1e12,
                "fraction_of_peak": rate * flops_per_image / peak,
            }
            print(f"  {size:>4} px {name:<9} {rate:10.1f} img/s  {rate * flops_per_image / 1e12:8.2f} TFLOP/s  "
                  f"{rate * flops_per_image / peak:6.1%} of {precision}'s peak", flush=True)
        rows.append(row)
        keras.backend.clear_session()
    return {"precision": precision, "dtype_policy": devices.DTYPE_POLICIES[precision], "matmul_tflops": peak / 1e12,
            "results": rows}


def main(setup):
    sizes = parse_sizes(IMAGE_SIZES)
    precisions = parse_precisions(PRECISIONS)
    keras.utils.set_random_seed(SEED)  # cli.run has set up the devices (with --distribute)
    environment = runs.environment()
    print(f"Backend {environment['backend']}, device {environment['device']}, precisions {', '.join(precisions)}, "
          f"batch size {BATCH_SIZE}")
    rng = np.random.default_rng(SEED)
    measured = [measure(precision, sizes, rng) for precision in precisions]
    print()
    print(markdown_table(measured))
    result = {"environment": environment, "batch_size": BATCH_SIZE, "matmul_size": MATMUL_SIZE,
              "precisions": measured}
    out_dir = Path(setup.out) / "benchmark"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"benchmark-{environment['backend']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nWritten: {path}")


def markdown_table(measured):
    lines = [
        "| precision | matrix-product peak (TFLOP/s) | image size | GFLOPs/image (forward) | inference img/s "
        "| inference TFLOP/s | of peak | training img/s | training TFLOP/s | of peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for precision in measured:
        for row in precision["results"]:
            inference, training = row["inference"], row["training"]
            lines.append(
                f"| {precision['precision']} | {precision['matmul_tflops']:.2f} | {row['image_size']} "
                f"| {row['forward_gflops_per_image']:.2f} | {inference['images_per_second']:.0f} "
                f"| {inference['tflops']:.2f} | {inference['fraction_of_peak']:.0%} "
                f"| {training['images_per_second']:.0f} | {training['tflops']:.2f} | {training['fraction_of_peak']:.0%} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(cli.run(main, globals(), pretrained=False))
