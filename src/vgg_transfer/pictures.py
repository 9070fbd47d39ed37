"""The pictures of a run folder, drawn with matplotlib's `Figure` (no pyplot, no display) and
scikit-learn's display classes: the loss curves, the confusion matrix, precision-recall and ROC
curves, the most confident mistakes, the model's architecture and the embedding of the test
images."""

import time

import keras
import matplotlib.offsetbox
import matplotlib.patches
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure
from sklearn import decomposition, manifold
from sklearn import metrics as sk_metrics

from vgg_transfer import activations, distribute


def plot_loss(path, epochs, title, phase_starts=()):
    """One panel per figure the model was compiled with (loss first, then each metric), each
    with its training and validation curves per epoch; later phases marked with dashed lines.

    Args:
        epochs: {"loss": [...], "val_loss": [...], "accuracy": [...], ...} over every epoch.
        phase_starts: the numbers of epochs done before each later phase began.
    """
    figures = ["loss", *sorted(key for key in epochs if not key.startswith("val_") and key not in
                                ("loss", "learning_rate"))]
    figure = Figure(figsize=(5.5 * len(figures), 4.2))
    for axes, key in zip(np.atleast_1d(figure.subplots(1, len(figures))), figures):
        for prefix, name in (("", "training"), ("val_", "validation")):
            values = epochs.get(prefix + key) or []
            axes.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=name)
        for number, start in enumerate(phase_starts, start=2):
            axes.axvline(start + 0.5, color="grey", linestyle="--", linewidth=1)
            axes.annotate(f"phase {number}", (start + 0.6, 1), xycoords=("data", "axes fraction"),
                          va="top", fontsize=8, color="grey")
        axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_ylabel(key.replace("_", " "))
        axes.set_title(key.replace("_", " ").capitalize())
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_confusion_matrix(path, counts, normalised, class_names, title):
    """Counts (left) and rows normalised to recall (right); rows are true classes."""
    size = max(5.0, 0.55 * len(class_names) + 2.5)
    figure = Figure(figsize=(2 * size + 1, size))
    for axes, values, subtitle, value_format in zip(figure.subplots(1, 2), (counts, normalised),
                                                     ("counts", "normalised by true class"), ("d", ".2f")):
        display = sk_metrics.ConfusionMatrixDisplay(values, display_labels=class_names)
        display.plot(ax=axes, cmap="Blues", xticks_rotation=45, values_format=value_format,
                     include_values=len(class_names) <= 20, text_kw={"fontsize": 7})
        axes.set_title(subtitle)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_pr_and_roc_curves(folder, probabilities, labels, class_names, title):
    """pr_curves.png (precision-recall per class) and roc_curves.png (one-vs-rest ROC per class).

    Returns:
        dict class name -> {"average_precision", "roc_auc"} (None for a class absent from the labels).
    """
    areas = {}
    pr_figure, roc_figure = Figure(figsize=(7.5, 6)), Figure(figsize=(7.5, 6))
    pr_axes, roc_axes = pr_figure.subplots(), roc_figure.subplots()
    present = [index for index in range(len(class_names)) if 0 < np.sum(labels == index) < len(labels)]
    for index, name in enumerate(class_names):
        if index not in present:
            areas[name] = {"average_precision": None, "roc_auc": None}
            continue
        truth, scores = labels == index, probabilities[:, index]
        pr = sk_metrics.PrecisionRecallDisplay.from_predictions(truth, scores, name=name, ax=pr_axes)
        roc = sk_metrics.RocCurveDisplay.from_predictions(truth, scores, name=name, ax=roc_axes,
                                                          plot_chance_level=index == present[-1])
        areas[name] = {"average_precision": float(pr.average_precision), "roc_auc": float(roc.roc_auc)}
    for axes, subtitle, corner in ((pr_axes, "Precision-recall per class (test set)", "lower left"),
                                   (roc_axes, "ROC per class, one vs rest (test set)", "lower right")):
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1.02)
        axes.set_title(f"{subtitle}\n{title}", fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc=corner)
    for figure, file_name in ((pr_figure, "pr_curves.png"), (roc_figure, "roc_curves.png")):
        figure.tight_layout()
        figure.savefig(folder / file_name, dpi=110)
    return areas


MISTAKES_PER_CLASS = 5


def plot_confident_mistakes(path, images, labels, probabilities, class_names, title, per_class=MISTAKES_PER_CLASS):
    """A grid of the most confident mistakes: one row per true class, up to `per_class` images,
    each captioned with the predicted class and its probability. Drawn as one mosaic on one
    axes: a grid of one axes per image took twice as long.

    Returns:
        The test indices shown, a list per true class, most confident first.
    """
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    rows, (height, width) = len(class_names), images.shape[1:3]
    cell_height, cell_width = int(height * 1.35), int(width * 1.25)  # room for a two-line caption above each image
    mosaic = np.full((rows * cell_height, per_class * cell_width, 3), 255, np.uint8)
    figure = Figure(figsize=(1.9 * per_class + 1.4, 1.75 * rows + 0.8))
    axes = figure.subplots()
    shown = []
    for row in range(rows):
        wrong = np.flatnonzero((labels == row) & (predicted != row))
        shown.append(wrong[np.argsort(-confidence[wrong], kind="stable")][:per_class].tolist())
        for column, index in enumerate(shown[-1]):
            top, left = row * cell_height + cell_height - height, column * cell_width + (cell_width - width) // 2
            mosaic[top:top + height, left:left + width] = images[index]
            axes.text(left + width / 2, top - 1, f"{class_names[predicted[index]]} {confidence[index]:.0%}\n"
                      f"(test #{index})", ha="center", va="bottom", fontsize=7.5, color="firebrick")
    axes.imshow(mosaic, interpolation="nearest")
    axes.set_xticks([])
    axes.set_yticks([row * cell_height + cell_height - height / 2 for row in range(rows)], class_names, fontsize=9)
    axes.tick_params(length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)
    figure.suptitle(f"Most confident mistakes per true class (row): predicted class and probability\n{title}",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return shown


def _groups(model):
    """The model's layers in drawing order, grouped: [(group name, [layers])], nested models
    opened: the preprocessing, VGG16's blocks by name, the head, the rest; a part with poolings
    (a network from scratch) gets one group per pooling stage."""
    groups, stage_ended = [], False
    for layer in activations.all_layers(model):
        if getattr(layer, "layers", None) or isinstance(layer, keras.layers.InputLayer):
            continue
        name = layer.name.split("_")[0] if layer.name.startswith("block") else next(
            (outer.name for outer in activations.all_layers(model) if layer in getattr(outer, "layers", [])),
            model.name)
        if not groups or groups[-1][0] != name or stage_ended:
            groups.append((name, []))
        groups[-1][1].append(layer)
        stage_ended = isinstance(layer, keras.layers.MaxPooling2D)
    return groups


def plot_architecture(path, model, title):
    """The model drawn layer by layer with matplotlib (`keras.utils.plot_model` needs graphviz,
    which pip does not install): one column per part (the preprocessing, each VGG16 block, the
    head), each layer with its output shape, coloured by whether it trained or stayed frozen."""
    groups = _groups(model)
    rows = max(len(layers) for _, layers in groups)
    figure = Figure(figsize=(2.15 * len(groups) + 0.6, 0.62 * rows + 1.9))
    axes = figure.subplots()
    colours = {"trained": "#f4a261", "frozen": "#8ecae6", "no weights": "#f1f1f1"}
    for column, (group, layers) in enumerate(groups):
        axes.text(column + 0.5, -0.55, group, ha="center", va="center", fontsize=8.5, weight="bold")
        for row, layer in enumerate(layers):
            kind = ("no weights" if not layer.weights else "trained" if layer.trainable_weights else "frozen")
            axes.add_patch(matplotlib.patches.FancyBboxPatch(
                (column + 0.06, row + 0.08), 0.88, 0.8, boxstyle="round,pad=0.01", facecolor=colours[kind],
                edgecolor="grey", linewidth=0.6))
            shape = "x".join(str(side) for side in activations.output_shape(layer)[1:])
            axes.text(column + 0.5, row + 0.48, f"{layer.name}\n{type(layer).__name__} {shape}", ha="center",
                      va="center", fontsize=6.3)
        if column:
            axes.annotate("", (column + 0.05, 0.48), (column - 0.05, 0.48), arrowprops={"arrowstyle": "->"})
    axes.set_xlim(0, len(groups))
    axes.set_ylim(rows, -1)
    axes.axis("off")
    trainable = sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)
    axes.legend(handles=[matplotlib.patches.Patch(facecolor=colour, edgecolor="grey", label=kind)
                         for kind, colour in colours.items()], loc="lower right", fontsize=8, ncol=3)
    figure.suptitle(f"{model.name}: {trainable:,} trainable of {model.count_params():,} parameters "
                    f"(raw uint8 images in, left to right)\n{title}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# The embedding picture's budget: at most this many test images, and the model's passes over
# them stop after FORWARD_SECONDS, so that the picture adds at most about 10 s to a run (t-SNE on
# 1,000 points takes 2 to 3 s on 2 cores).
EMBEDDING_IMAGES = 1000
FORWARD_SECONDS = 4.0


def embedded_layer(model):
    """The layer whose input the embedding picture shows: the model's last Dense layer (the
    classifier), so its input is the head's last hidden layer."""
    return [layer for layer in activations.all_layers(model) if isinstance(layer, keras.layers.Dense)][-1]


def plot_embedding(path, model, inputs, images, labels, class_names, title, seed=0):
    """embedding.png: what the head's last hidden layer makes of the test images, projected to
    2-D with PCA and with t-SNE (on PCA's 50 first components), coloured by class, with a few
    thumbnails. At most EMBEDDING_IMAGES images, drawn at random, fewer if the model's passes
    reach FORWARD_SECONDS; the picture says how many.

    `model` (the whole model, or its head) runs on `inputs`, what it takes for the test `images`:
    the images themselves, or their cached features.

    Returns:
        How many test images the picture shows.
    """
    order = np.random.default_rng(seed).permutation(len(labels))[:EMBEDDING_IMAGES]
    last_dense = embedded_layer(model)
    started, parts = time.perf_counter(), []
    for start in range(0, len(order), 200):
        rows = np.sort(order[start:start + 200])
        parts.append((rows, activations.first_calls(model, [last_dense], inputs[rows], received=True)[0]))
        if not distribute.every_worker(time.perf_counter() - started <= FORWARD_SECONDS):  # the same passes on all
            break
    chosen = np.concatenate([rows for rows, _ in parts])
    hidden = np.concatenate([values.reshape(len(values), -1) for _, values in parts])
    principal = decomposition.PCA(min(50, *hidden.shape), random_state=seed).fit_transform(hidden)
    tsne = manifold.TSNE(2, init="pca", perplexity=min(30, len(chosen) - 1), max_iter=500,
                         random_state=seed).fit_transform(principal)
    figure = Figure(figsize=(14, 6.6))
    colours = matplotlib.colormaps["tab10" if len(class_names) <= 10 else "tab20"]
    for axes, points, name in zip(figure.subplots(1, 2), (principal[:, :2], tsne), ("PCA", "t-SNE")):
        for index, class_name in enumerate(class_names):
            mine = labels[chosen] == index
            axes.scatter(points[mine, 0], points[mine, 1], s=7, color=colours(index % colours.N), label=class_name)
        for index in range(len(class_names)):  # two thumbnails of each class
            for position in np.flatnonzero(labels[chosen] == index)[:2]:
                thumbnail = matplotlib.offsetbox.OffsetImage(images[chosen[position]], zoom=0.8)
                axes.add_artist(matplotlib.offsetbox.AnnotationBbox(
                    thumbnail, points[position], frameon=True, pad=0.1,
                    bboxprops={"edgecolor": colours(index % colours.N), "linewidth": 1.5}))
        axes.set_title(f"{name} of the head's last hidden layer ({hidden.shape[1]} values)", fontsize=10)
        axes.set_xticks([])
        axes.set_yticks([])
    figure.axes[0].legend(fontsize=8, markerscale=2.5, loc="best")
    figure.suptitle(f"{len(chosen):,} of the {len(labels):,} test images"
                    f"{', drawn at random' if len(chosen) < len(labels) else ''}, one point each\n{title}",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return len(chosen)
