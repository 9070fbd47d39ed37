"""Classifies image files with a model this project saved, and prints the top classes.

Takes image files or folders (searched recursively for files Pillow can read) of any size,
format and mode; each image is converted to RGB and resized to the size the model takes,
as the data loader does. Works with any run folder (its model.keras and, for the class
names, its metrics.json) or a `.keras` file.

    python src/predict.py photo.jpg more_photos/ --model out/transfer_learning/20261123-023520
    python src/predict.py photo.png --model model.keras --json

A file that cannot be read gets one error line and the others are still classified; the
exit status is then 1.
"""

import argparse
import importlib
import json
import sys
from pathlib import Path

from PIL import Image

from vgg_transfer import cli, image_files, saved_models
from vgg_transfer.errors import InputError

TOP = 3


def parse_arguments(argv=None):
    parser = cli.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    parser.add_argument("--model", required=True, metavar="RUN_DIR_OR_MODEL",
                        help="a run folder (with model.keras) or a .keras file")
    parser.add_argument("--top", type=int, default=TOP, help=f"how many classes to print (default: {TOP})")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    arguments = parser.parse_args(argv)
    if arguments.top < 1:
        raise InputError(f"--top {arguments.top} is out of range; it must be at least 1")
    return arguments


def files_to_classify(paths):
    """The files to classify, in the order given (folders expanded, sorted)."""
    readable = set(Image.registered_extensions())
    for path in map(Path, paths):
        if path.is_dir():
            yield from (file for file in image_files.files_in(path) if file.suffix.lower() in readable)
        else:
            yield path  # named explicitly: an unreadable one is reported, not skipped


def main(arguments):
    import numpy as np

    model, class_names, side = saved_models.load_saved_classifier(arguments.model, import_script=importlib.import_module)
    paths, images, failures = [], [], 0
    for path in files_to_classify(arguments.paths):
        try:
            images.append(image_files.read_image_file(path, side))
            paths.append(path)
        except InputError as error:
            print(f"predict.py: error: {error}", file=sys.stderr)
            failures += 1
    if not images and not failures:
        raise InputError("no image files found in the paths given")
    results = []
    if images:
        probabilities = np.asarray(model.predict(np.stack(images), batch_size=64, verbose=0), dtype=np.float64)
        for path, row in zip(paths, probabilities):
            best = np.argsort(-row, kind="stable")[: arguments.top]
            results.append({"path": str(path),
                            "top": [{"class": class_names[i], "probability": float(row[i])} for i in best]})
            if not arguments.json:
                print(f"{path}: " + ", ".join(f"{class_names[i]} {row[i]:.1%}" for i in best))
    if arguments.json:
        print(json.dumps({"model": str(arguments.model), "predictions": results}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(cli.run_tool(main, parse_arguments))
