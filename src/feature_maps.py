"""What VGG16 sees: the strongest feature maps of several layers of a saved model, image by image.

For each image, one picture with the image and, for each chosen layer (default: the last
convolution of each VGG16 block the model has), the channels with the highest mean activation
on it, each row labelled with its layer and output shape. Without IMAGES, one test image of
each class of the run's data (or of --data). Any model this project saved, on every backend.

    python src/feature_maps.py --model out/transfer_learning/20261125-090235
    python src/feature_maps.py cat.jpg --model RUN_DIR --layers block1_conv2 block3_conv3

Writes out/feature_maps/<timestamp>/feature_maps_<image>.png, and feature_maps.npz with the
chosen channels' maps (layer name -> (images, height, width, channels)).
"""

import argparse
import importlib
import re
import sys
import time
from pathlib import Path

# The project's package first: it loads Keras without TensorFlow's start-up lines.
from vgg_transfer import activations, cli, paths, runs, saved_models
from vgg_transfer.errors import InputError

import keras
import numpy as np
from matplotlib.figure import Figure

CHANNELS = 8  # the strongest channels shown per layer


def parse_arguments(argv=None):
    parser = cli.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files (default: a test image per class)")
    parser.add_argument("--model", required=True, metavar="RUN_DIR_OR_MODEL", help="a run folder or a .keras file")
    parser.add_argument("--layers", nargs="+", metavar="NAME", help="convolution or pooling layers "
                        "(default: the last convolution of each VGG16 block in the model)")
    parser.add_argument("--channels", type=int, default=CHANNELS, help=f"channels per layer (default: {CHANNELS})")
    parser.add_argument("--data", default=None, metavar="PATH", help="data for the default test images "
                        "(default: the run's data, from its metrics.json, else in/)")
    parser.add_argument("--out", default=str(paths.out_dir()), metavar="DIR")
    arguments = parser.parse_args(argv)
    if arguments.channels < 1:
        raise InputError(f"--channels {arguments.channels} is out of range; pass at least 1")
    return arguments


def chosen_layers(model, names):
    """The named spatial layers of the model (nested ones included), or by default the last
    convolution of each VGG16 block it has."""
    spatial = [layer for layer in activations.all_layers(model)
               if isinstance(layer, (keras.layers.Conv2D, keras.layers.MaxPooling2D)) and layer.name != "rgb_to_bgr"]
    if names:
        by_name = {layer.name: layer for layer in spatial}
        unknown = [name for name in names if name not in by_name]
        if unknown:
            raise InputError(f"--layers {' '.join(unknown)}: not a convolution or pooling layer of the model; "
                             f"use some of {', '.join(by_name)}")
        return [by_name[name] for name in names]
    last_of_block = {}
    for layer in spatial:
        if re.fullmatch(r"block\d_conv\d", layer.name):
            last_of_block[layer.name.split("_")[0]] = layer
    if not last_of_block:
        raise InputError(f"model {model.name} has no VGG16 block; name the layers with --layers")
    return list(last_of_block.values())


def plot(path, image, caption, maps_by_layer, title):
    """One image (left) and, per layer, its strongest channels in a row."""
    columns = max(maps.shape[-1] for maps, _ in maps_by_layer.values())
    figure = Figure(figsize=(1.35 * (columns + 2), 1.45 * len(maps_by_layer) + 0.9))
    grid = figure.add_gridspec(len(maps_by_layer), columns + 2)
    image_axes = figure.add_subplot(grid[:, :2])
    image_axes.imshow(image, interpolation="nearest")
    image_axes.set_title(caption, fontsize=8)
    image_axes.axis("off")
    for row, (name, (maps, shape)) in enumerate(maps_by_layer.items()):
        for column in range(maps.shape[-1]):
            axes = figure.add_subplot(grid[row, column + 2])
            axes.imshow(maps[..., column], cmap="viridis", interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            if column == 0:
                axes.set_ylabel(f"{name}\n{'x'.join(map(str, shape))}", fontsize=7, rotation=0, ha="right",
                                va="center")
    figure.suptitle(f"The {columns} strongest channels of each layer (brighter: stronger)\n{title}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(arguments):
    runs.check_writable(arguments.out)
    model, class_names, side = saved_models.load_saved_classifier(arguments.model, import_script=importlib.import_module)
    layers = chosen_layers(model, arguments.layers)
    images, captions = saved_models.images_to_show(arguments.images, arguments.model, side, len(class_names),
                                             arguments.data)
    outputs = activations.first_calls(model, layers, images)
    folder = Path(arguments.out) / "feature_maps" / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=False)
    strongest = {}
    for layer, output in zip(layers, outputs):
        channels = min(arguments.channels, output.shape[-1])
        order = np.argsort(-output.mean(axis=(1, 2)), axis=1, kind="stable")[:, :channels]  # per image
        strongest[layer.name] = (np.take_along_axis(output, order[:, None, None, :], axis=3), output.shape[1:])
    for index, (image, caption) in enumerate(zip(images, captions)):
        stem = re.sub(r"[^A-Za-z0-9]+", "_", Path(caption).stem if arguments.images else caption).strip("_")
        plot(folder / f"feature_maps_{stem}.png", image, caption,
             {name: (maps[index], shape) for name, (maps, shape) in strongest.items()}, f"model {arguments.model}")
    np.savez_compressed(folder / "feature_maps.npz", **{name: maps for name, (maps, _) in strongest.items()})
    print(f"Feature maps of {len(images)} images from {', '.join(layer.name for layer in layers)}: {folder}")


if __name__ == "__main__":
    sys.exit(cli.run_tool(main, parse_arguments))
