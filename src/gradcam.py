"""Grad-CAM heatmaps: which parts of an image a saved model's convolutions base their class on.

For each image it draws the image and the heatmap over it, titled with the class explained
and its probability, from a named convolution layer (default: the VGG16 base's last one the
model uses). Works with the model of any script (functional, Sequential or subclassed) on
the TensorFlow and JAX backends. Without IMAGES, it explains the first IMAGES_PER_CLASS test
images of each class of the run's data (or of --data).

    python src/gradcam.py --model out/transfer_learning/20261123-023520
    python src/gradcam.py cat.jpg dog.png --model out/fine_tune/20261123-052955 --layer block5_conv3

Writes out/gradcam/<timestamp>/gradcam.png (and heatmaps.npz with the raw maps).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from vgg_transfer import cli, data, gradcam, models, paths, runs
from vgg_transfer.errors import InputError

IMAGES_PER_CLASS = 2


def parse_arguments(argv=None):
    parser = cli.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files (default: test images per class)")
    parser.add_argument("--model", required=True, metavar="RUN_DIR_OR_MODEL", help="a run folder or a .keras file")
    parser.add_argument("--layer", default=None, help="the convolution layer (default: the base's last)")
    parser.add_argument("--data", default=None, metavar="PATH", help="data for the default test images "
                        "(default: the run's data, from its metrics.json, else in/)")
    parser.add_argument("--images-per-class", type=int, default=IMAGES_PER_CLASS)
    parser.add_argument("--out", default=str(paths.out_dir()), metavar="DIR")
    return parser.parse_args(argv)


def chosen_images(arguments, side, class_names):
    """(uint8 images, their titles' first lines)."""
    if arguments.images:
        images = [data.read_image_file(path, side) for path in arguments.images]
        return np.stack(images), [Path(path).name for path in arguments.images]
    data_path = arguments.data or _run_data_path(arguments.model)
    dataset = data.load_dataset(data_path, verbose=False)
    picks = [index for label in range(len(class_names))
             for index in np.flatnonzero(dataset.y_test == label)[: arguments.images_per_class]]
    images = dataset.x_test[picks]
    if images.shape[1] != side:
        raise InputError(f"the model takes {side}-pixel images but {dataset.source} holds "
                         f"{images.shape[1]}-pixel ones; pass the run's data with --data, or image files")
    return images, [f"test #{index}, true: {dataset.class_names[dataset.y_test[index]]}" for index in picks]


def _run_data_path(model_path):
    """The data path a run was trained on, if its metrics.json names a local one."""
    source = models.saved_run_metrics(model_path).get("data", {}).get("source", "")
    candidate = Path(source.rsplit(" (", 1)[0])
    return candidate if source and candidate.exists() else None


def plot(path, images, maps, probabilities, class_names, captions, title, layer_name):
    columns = 4  # two (image, heatmap) pairs per row
    rows = int(np.ceil(len(images) / 2))
    height = 2.7 * rows + 0.8
    figure = Figure(figsize=(2.3 * columns, height))
    grid = figure.subplots(rows, columns, squeeze=False)
    for axes in grid.flat:
        axes.axis("off")
    for index, (image, heatmap) in enumerate(zip(images, maps)):
        row, column = divmod(index, 2)
        predicted = int(probabilities[index].argmax())
        grid[row, 2 * column].imshow(image, interpolation="nearest")
        grid[row, 2 * column].set_title(captions[index], fontsize=7)
        grid[row, 2 * column + 1].imshow(image, interpolation="nearest")
        grid[row, 2 * column + 1].imshow(heatmap, cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
        grid[row, 2 * column + 1].set_title(
            f"Grad-CAM: {class_names[predicted]} {probabilities[index, predicted]:.0%}", fontsize=7)
    figure.suptitle(f"Grad-CAM from {layer_name} (red: most evidence for the predicted class)\n{title}", fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.7 / height))  # room for the two-line title
    figure.savefig(path, dpi=120)


def main(arguments):
    runs.check_writable(arguments.out)
    model, class_names, side = models.load_saved_classifier(arguments.model)
    layer = gradcam.find_layer(model, arguments.layer) if arguments.layer else gradcam.default_layer(model)
    images, captions = chosen_images(arguments, side, class_names)
    maps, probabilities = gradcam.heatmaps(model, images, layer)
    folder = Path(arguments.out) / "gradcam" / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=False)
    np.savez_compressed(folder / "heatmaps.npz", heatmaps=maps, images=images, probabilities=probabilities)
    plot(folder / "gradcam.png", images, maps, probabilities, class_names, captions, f"model {arguments.model}",
         layer.name)
    print(f"Grad-CAM of {len(images)} images from {layer.name}: {folder / 'gradcam.png'}")


if __name__ == "__main__":
    sys.exit(cli.run_tool(main, parse_arguments))
