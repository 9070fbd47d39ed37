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
import importlib
import sys
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from vgg_transfer import cli, gradcam, paths, runs, saved_models

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
    model, class_names, side = saved_models.load_saved_classifier(arguments.model, import_script=importlib.import_module)
    layer = gradcam.find_layer(model, arguments.layer) if arguments.layer else gradcam.default_layer(model)
    images, captions = saved_models.images_to_show(arguments.images, arguments.model, side, len(class_names),
                                             arguments.data, arguments.images_per_class)
    maps, probabilities = gradcam.heatmaps(model, images, layer)
    folder = Path(arguments.out) / "gradcam" / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=False)
    np.savez_compressed(folder / "heatmaps.npz", heatmaps=maps, images=images, probabilities=probabilities)
    plot(folder / "gradcam.png", images, maps, probabilities, class_names, captions, f"model {arguments.model}",
         layer.name)
    print(f"Grad-CAM of {len(images)} images from {layer.name}: {folder / 'gradcam.png'}")


if __name__ == "__main__":
    sys.exit(cli.run_tool(main, parse_arguments))
