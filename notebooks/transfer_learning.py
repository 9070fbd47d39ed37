# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
#     provenance: []
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Transfer learning with VGG16 on CIFAR-10
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/vgg-transfer/vgg16-cifar10-keras/blob/main/notebooks/transfer_learning.ipynb)
#
# **Description:** a frozen VGG16 with its ImageNet weights turns each CIFAR-10 image into
# features; a small dense head learns to classify them. Then part of VGG16 is fine-tuned, and
# the trained model classifies a picture of your own.
#
# This notebook runs the project's scripts themselves (`src/transfer_learning.py`,
# `src/fine_tune.py`, `src/gradcam.py`, `src/predict.py`), as commands: each script picks its
# recipe and precision for the machine and sets Keras's global state as it starts, so each one
# gets a fresh process, as in a terminal. The scripts stay the one place every recipe lives:
# to change the model itself, edit the constants at the top of a script.
#
# This file is generated from `notebooks/transfer_learning.py`; edit that, then run
# `jupytext --to ipynb notebooks/transfer_learning.py`.

# %% [markdown]
# ## Setup
#
# On Colab this cell clones the project and installs its requirements (Colab already has
# TensorFlow, Keras and JAX); elsewhere it works in the clone the notebook is in. In Colab,
# choose a GPU first: *Runtime > Change runtime type > T4 GPU*.

# %%
import json
import os
import subprocess
import sys
from pathlib import Path

from IPython.display import Image, Markdown, display

REPOSITORY = "https://github.com/vgg-transfer/vgg16-cifar10-keras"  # the project's address: the one place it is kept
IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
    if not Path("vgg16-cifar10-keras").is_dir():
        subprocess.run(["git", "clone", "--depth", "1", REPOSITORY], check=True)
    os.chdir("vgg16-cifar10-keras")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-r", "requirements.txt"], check=True)
elif not Path("src").is_dir() and Path("../src").is_dir():
    os.chdir("..")  # opened from notebooks/: work from the project's root, as the README's commands do
print("Working in", Path.cwd())

# %% [markdown]
# ## Parameters
#
# `None` keeps what the scripts choose for this machine (the constants at the top of each
# script) and Keras's own downloads of CIFAR-10 and the ImageNet weights. Set `SUBSET = 2000`
# for a quick look.

# %% tags=["parameters"]
DATA = None  # None: in/, then Keras's CIFAR-10 download; or an archive or folder of images
WEIGHTS = None  # None: VGG16's ImageNet weights (in/, then Keras's download); "none"; or a file
SUBSET = None  # None: every image; N: N training images and N/5 test images
EPOCHS = None  # None: the script's EPOCHS
FINE_TUNE_EPOCHS = None  # None: fine_tune.py's FINE_TUNE_EPOCHS
BATCH_SIZE = None  # None: the script's BATCH_SIZE
IMAGE = None  # the picture to classify: None for the first test image
OUT = None  # None: the project's out/


# %%
def run(script, *arguments, **flags):
    """Runs src/`script` with `arguments` and `--name value` for every flag that is not None,
    printing its output as it comes; returns its lines. Keras prints one line per epoch here,
    not a bar per step (its output is not a terminal)."""
    command = [sys.executable, f"src/{script}", *map(str, arguments)]
    for name, value in flags.items():
        if value is not None:
            command += [f"--{name.replace('_', '-')}", str(value)]
    print("$ python", " ".join(command[1:]), flush=True)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    if process.wait() != 0:
        raise RuntimeError(f"{script} stopped with status {process.returncode}: {lines[-1] if lines else ''}")
    return lines


def run_folder(lines):
    """The run folder a training script names in its last lines."""
    return Path(next(line.split(": ", 1)[1] for line in lines if line.startswith("Run folder: ")))


# %% [markdown]
# ## Train the head on a frozen VGG16
#
# The main job: VGG16 is cut after block 4 and frozen, its features of every image are
# computed once (and cached), and the dense head trains on them with early stopping,
# learning-rate reduction and checkpointing. The first lines say which recipe this machine
# gets and in which precision it computes (on Colab's T4: float16 with loss scaling).

# %%
lines = run("transfer_learning.py", data=DATA, weights=WEIGHTS, subset=SUBSET, epochs=EPOCHS,
            batch_size=BATCH_SIZE, out=OUT)
RUN_DIR = run_folder(lines)
metrics = json.loads((RUN_DIR / "metrics.json").read_text())
display(Markdown(f"**{metrics['test_accuracy']:.2%}** test accuracy; recipe "
                 f"`{metrics['hyperparameters']['HARDWARE']}`, {metrics['precision']['name']} "
                 f"({metrics['precision']['reason']}), on {metrics['environment']['device']}."))

# %% [markdown]
# The loss curves: training and validation loss per epoch. A validation loss that turns up
# while the training loss keeps falling is overfitting; early stopping keeps the best epoch.

# %%
display(Image(filename=str(RUN_DIR / "loss_plot.png")))

# %% [markdown]
# The confusion matrix on the test images: which classes the model mixes up (cats and dogs,
# usually), and its most confident mistakes.

# %%
display(Image(filename=str(RUN_DIR / "confusion_matrix.png")))
display(Image(filename=str(RUN_DIR / "mistakes.png")))

# %% [markdown]
# ## Where the model looks: Grad-CAM
#
# Grad-CAM weighs the last convolution's feature maps by how much each one raises the
# predicted class: warm regions are what the decision rests on.

# %%
lines = run("gradcam.py", model=RUN_DIR, data=DATA, out=OUT)
display(Image(filename=lines[-1].rsplit(": ", 1)[1]))

# %% [markdown]
# ## Fine-tune part of VGG16
#
# Two phases, as Keras's guide does it: the head on the frozen base, then the top of the
# base unfrozen and trained with the head at a ten times lower rate, so the pretrained
# weights are adjusted, not overwritten. On a GPU the whole base trains on augmented images.

# %%
lines = run("fine_tune.py", data=DATA, weights=WEIGHTS, subset=SUBSET, epochs=EPOCHS,
            fine_tune_epochs=FINE_TUNE_EPOCHS, batch_size=BATCH_SIZE, out=OUT)
FINE_TUNED_DIR = run_folder(lines)
display(Image(filename=str(FINE_TUNED_DIR / "loss_plot.png")))

# %% [markdown]
# ## Classify a picture
#
# On Colab, set `UPLOAD = True` and run this cell to upload a photo of your own; otherwise
# `IMAGE`, or the first test image, is classified by the fine-tuned model.

# %%
UPLOAD = False
if IN_COLAB and UPLOAD:
    from google.colab import files

    IMAGE = next(iter(files.upload()))
if IMAGE is None:
    sys.path.insert(0, "src")
    from PIL import Image as PillowImage

    from vgg_transfer import data

    test_set = data.load_dataset(DATA, subset=SUBSET, verbose=False)
    IMAGE = "test_image.png"
    PillowImage.fromarray(test_set.x_test[0]).save(IMAGE)
    print("The first test image, a", test_set.class_names[test_set.y_test[0]])
display(Image(filename=str(IMAGE), width=128))
run("predict.py", IMAGE, model=FINE_TUNED_DIR)

# %% [markdown]
# ## What to change next
#
# - `HEAD_UNITS`, `HEAD_DROPOUT` or `LEARNING_RATE` at the top of `src/transfer_learning.py`:
#   with the features cached, a rerun trains only the head.
# - `UNFREEZE_FROM` in `src/fine_tune.py`: how much of VGG16 is fine-tuned.
# - Every run folder also holds `report.md`, `metrics.json` and more; `python src/compare.py`
#   puts every run in one table.
