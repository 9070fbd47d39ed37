"""A look at the data before training: class counts, sample images and, for image folders,
the sizes the images came in.

Writes to out/explore_data/<timestamp>/:
- class_distribution.png: images per class in the training, validation and test sets;
- samples.png: SAMPLES_PER_CLASS training images of each class;
- augmentation.png: a few training images, several draws of the augmentation the training
  scripts use, and VGG16's preprocessing step by step (resized, and as the network sees it);
- image_sizes.png (image-folder data only): the original width and height of every image,
  before the loader converted them to one square size.

It prints the images per class in the training, validation and test sets, and where each set
comes from (for class folders alone: the split the training scripts make).

    python src/explore_data.py
    python src/explore_data.py --data in/my-images.tar.gz
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from vgg_transfer import cli, data, paths, runs
from vgg_transfer.errors import InputError

SAMPLES_PER_CLASS = 8
VALIDATION_SPLIT = 0.1
TEST_SPLIT = 0.2  # as the training scripts split class folders that have no test/
SEED = 42
AUGMENTED_IMAGES = 4  # training images shown in augmentation.png
DRAWS = 5  # augmentation draws of each
IMAGE_SIZE = 128  # the side shown as "resized": the GPU recipes' (at CIFAR-10's 32 px a CPU recipe does not resize)


def parse_arguments(argv=None):
    parser = cli.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, metavar="PATH", help="as for the training scripts (default: in/)")
    parser.add_argument("--samples-per-class", type=int, default=SAMPLES_PER_CLASS)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="the side the preprocessing preview "
                        f"resizes to (default: {IMAGE_SIZE})")
    parser.add_argument("--out", default=str(paths.out_dir()), metavar="DIR")
    arguments = parser.parse_args(argv)
    if arguments.image_size < 32:
        raise InputError(f"--image-size {arguments.image_size} is out of range; pass at least 32 (VGG16's minimum)")
    if arguments.samples_per_class < 1:
        raise InputError(f"--samples-per-class {arguments.samples_per_class} is out of range; pass at least 1")
    return arguments


def plot_class_distribution(path, dataset, title):
    names = list(dataset.class_names)
    positions = np.arange(len(names))
    figure = Figure(figsize=(max(7, 0.8 * len(names) + 2), 4.5))
    axes = figure.subplots()
    width = 0.27
    for offset, (split, labels) in zip((-width, 0, width), (("training", dataset.y_train),
                                                           ("validation", dataset.y_val), ("test", dataset.y_test))):
        counts = np.bincount(labels, minlength=len(names))
        bars = axes.bar(positions + offset, counts, width, label=f"{split} ({len(labels):,})")
        axes.bar_label(bars, fontsize=6, rotation=90, padding=2)
    axes.set_xticks(positions, names, rotation=30, ha="right")
    axes.set_ylabel("images")
    axes.set_xlabel("class")
    axes.margins(y=0.15)
    axes.legend()
    axes.set_title(f"Images per class\n{title}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_samples(path, dataset, per_class, title):
    names = list(dataset.class_names)
    figure = Figure(figsize=(1.2 * per_class + 1.3, 1.25 * len(names) + 0.8))
    grid = figure.subplots(len(names), per_class, squeeze=False)
    for row, name in enumerate(names):
        picks = np.flatnonzero(dataset.y_train == row)[:per_class]
        for column in range(per_class):
            axes = grid[row, column]
            axes.set_xticks([])
            axes.set_yticks([])
            if column < len(picks):
                axes.imshow(dataset.x_train[picks[column]], interpolation="nearest")
        grid[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    figure.suptitle(f"Training images, {per_class} per class (rows)\n{title}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_image_sizes(path, sizes, title):
    widths, heights = np.array(sizes).T
    figure = Figure(figsize=(11, 4.5))
    scatter, histogram = figure.subplots(1, 2)
    unique, counts = np.unique(np.stack([widths, heights], axis=1), axis=0, return_counts=True)
    scatter.scatter(unique[:, 0], unique[:, 1], s=20 + 200 * counts / counts.max(), alpha=0.6)
    for (width, height), count in zip(unique[np.argsort(-counts)][:5], np.sort(counts)[::-1][:5]):
        scatter.annotate(f"{width}x{height}: {count:,}", (width, height), fontsize=7, xytext=(4, 4),
                         textcoords="offset points")
    scatter.set_xlabel("width (pixels)")
    scatter.set_ylabel("height (pixels)")
    scatter.set_title("Original size of each image (marker area: how many)")
    histogram.hist(np.minimum(widths, heights), bins=min(40, max(5, len(unique))), color="tab:orange")
    histogram.set_xlabel("shorter side (pixels)")
    histogram.set_ylabel("images")
    histogram.set_title("Shorter side")
    for axes in (scatter, histogram):
        axes.grid(alpha=0.3)
    figure.suptitle(f"Image sizes as stored, before conversion\n{title}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_augmentation(path, images, image_size, draws, seed, title):
    """Each image: as stored, DRAWS draws of the training scripts' augmentation (random flips
    and shifts of up to 4 pixels, edges reflected), resized to `image_size`, and what VGG16's
    preprocessing makes of it: BGR minus the ImageNet means, shown viewable (channels back in
    RGB order, each image's values stretched to the full range)."""
    import keras

    from vgg_transfer import models

    keras.utils.set_random_seed(seed)
    augmentation = models.augmentation()
    augmented = [keras.ops.convert_to_numpy(augmentation(images.astype("float32"), training=True)) for _ in range(draws)]
    preprocessing = models.vgg16_preprocessing(images.shape[1:], image_size)
    preprocessed = keras.ops.convert_to_numpy(preprocessing(images))
    resized = keras.ops.convert_to_numpy(keras.layers.Resizing(image_size, image_size)(images.astype("float32")))
    columns = ["as stored"] + [f"augmented, draw {draw + 1}" for draw in range(draws)] + [
        f"resized to {image_size}", "as VGG16 sees it"]
    figure = Figure(figsize=(1.6 * len(columns), 1.75 * len(images) + 1.2))
    grid = figure.subplots(len(images), len(columns), squeeze=False)
    for row, image in enumerate(images):
        seen = preprocessed[row][..., ::-1]
        seen = (seen - seen.min()) / max(float(seen.max() - seen.min()), 1e-6)
        pictures = [image, *[draw[row] / 255 for draw in augmented], resized[row] / 255, seen]
        for column, (axes, picture) in enumerate(zip(grid[row], pictures)):
            axes.imshow(np.clip(picture, 0, 1) if picture.dtype != np.uint8 else picture, interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            if row == 0:
                axes.set_title(columns[column], fontsize=7.5)
    figure.suptitle(f"What the training scripts do to an image: augmentation (training only) and VGG16's "
                    f"preprocessing\n{title}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(arguments):
    runs.check_writable(arguments.out)
    dataset = data.load_dataset(arguments.data, VALIDATION_SPLIT, TEST_SPLIT, SEED)
    folder = Path(arguments.out) / "explore_data" / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True)
    title = dataset.source
    plot_class_distribution(folder / "class_distribution.png", dataset, title)
    plot_samples(folder / "samples.png", dataset, arguments.samples_per_class, title)
    first_of_classes = [np.flatnonzero(dataset.y_train == label)[0] for label in range(dataset.num_classes)]
    plot_augmentation(folder / "augmentation.png", dataset.x_train[first_of_classes[:AUGMENTED_IMAGES]],
                      arguments.image_size, DRAWS, SEED, title)
    written = ["class_distribution.png", "samples.png", "augmentation.png"]
    sizes = data.original_image_sizes(arguments.data)
    if sizes:
        plot_image_sizes(folder / "image_sizes.png", sizes, title)
        written.append("image_sizes.png")
    print_split(dataset)
    print(f"Wrote {', '.join(written)} to {folder}")


def print_split(dataset):
    """Images per class in each split, and where the validation and test sets come from."""
    counts = dataset.images_per_class()
    width = max(len(name) for name in dataset.class_names)
    print(f"{'class':<{width}} {'train':>8} {'validation':>10} {'test':>8}")
    for name in dataset.class_names:
        print(f"{name:<{width}} {counts['train'][name]:>8,} {counts['validation'][name]:>10,} {counts['test'][name]:>8,}")
    print(f"{'all':<{width}} {len(dataset.y_train):>8,} {len(dataset.y_val):>10,} {len(dataset.y_test):>8,}")
    print(f"Validation: {dataset.validation_source}. Test: {dataset.test_source}.")


if __name__ == "__main__":
    sys.exit(cli.run_tool(main, parse_arguments))
