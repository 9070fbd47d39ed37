"""Every file of a run folder: the test-set report, metrics.json, the pictures, the saved model.

All test figures come from one unshuffled pass over the test images (the `test_predictions`
a script passes in), so predictions and labels are aligned by construction; the
classification report, metrics.json and predictions.csv are all computed from that one pass.
Pictures are drawn with matplotlib's `Figure` (no pyplot, no display) and scikit-learn's
display classes.
"""

import csv
import json
import time

import keras
import matplotlib.offsetbox
import matplotlib.patches
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure
from sklearn import decomposition, manifold
from sklearn import metrics as sk_metrics

from vgg_transfer import activations, distribute, models, runs


def probabilities_and_loss(model, labels, outputs):
    """(class probabilities, mean test loss) from the model's outputs on the test images,
    read the way its compiled loss reads them: logits for a loss with `from_logits=True`,
    one-hot targets for a non-sparse loss (label smoothing needs one), else as they are."""
    loss = keras.losses.get(model.loss or "sparse_categorical_crossentropy")
    loss_config = loss.get_config() if isinstance(loss, keras.losses.Loss) else {"name": loss.__name__}
    outputs = np.asarray(outputs, dtype=np.float64)
    targets = labels if "sparse" in loss_config["name"] else keras.utils.to_categorical(labels, outputs.shape[1])
    value = float(np.mean(keras.ops.convert_to_numpy(loss(targets, outputs.astype(np.float32)))))
    if loss_config.get("from_logits"):
        outputs = keras.ops.convert_to_numpy(keras.ops.softmax(outputs)).astype(np.float64)
    return outputs, value


def write_run(run, model, dataset, history, test_predictions, settings, notes=None):
    """Writes every report file of a run, saves its model, and publishes the run folder.

    Args:
        run: the `runs.Run` being written; it is renamed to its final name at the end.
        model: the whole model to save (raw uint8 images in), compiled with the loss it was
            trained with, and with its best weights.
        dataset: the `data.Dataset` it was trained on.
        history: the `History` that `fit` returned (or a list of them, one per phase).
        test_predictions: the model's outputs on `dataset.x_test`, in order (N_test, classes).
        settings: `config.settings` (script, hyperparameters, data, weights...), for metrics.json.
        notes: more entries for metrics.json (the API, the strategy...).

    Returns:
        The metrics dict that was written to metrics.json.
    """
    labels = dataset.y_test
    probabilities, test_loss = probabilities_and_loss(model, labels, test_predictions)
    predicted = probabilities.argmax(axis=1)
    names = list(dataset.class_names)
    report_text = sk_metrics.classification_report(
        labels, predicted, labels=range(len(names)), target_names=names, digits=4, zero_division=0
    )
    report = sk_metrics.classification_report(
        labels, predicted, labels=range(len(names)), target_names=names, output_dict=True, zero_division=0
    )
    (run.path / "classification_report.txt").write_text(
        f"{run.script_name}: test set, {len(labels)} images, model {models.MODEL_FILE_NAME}\n\n{report_text}"
    )
    _write_predictions(run.path / "predictions.csv", labels, predicted, probabilities.max(axis=1), names)

    histories = history if isinstance(history, list) else [history]
    epochs = {key: [value for h in histories for value in h.history.get(key, [])]
              for key in sorted({key for h in histories for key in h.history})}
    phase_starts = list(np.cumsum([len(h.history.get("loss", [])) for h in histories])[:-1])
    _write_history(run.path / "history.csv", histories)
    title = f"{run.script_name}: {run.final_path.name}"
    accuracy = float(np.mean(predicted == labels))
    plot_loss(run.path / "loss_plot.png", epochs, title, phase_starts)
    counts, normalised = confusion_matrices(labels, predicted, len(names))
    plot_confusion_matrix(run.path / "confusion_matrix.png", counts, normalised, names,
                          f"{title}, test accuracy {accuracy:.2%}")
    areas = plot_pr_and_roc_curves(run.path, probabilities, labels, names, title)
    plot_confident_mistakes(run.path / "mistakes.png", dataset.x_test, labels, probabilities, names, title)
    plot_architecture(run.path / "architecture.png", model, title)
    write_model_summary(run.path / "model_summary.txt", model)
    with run.timed("embedding"):
        embedding_points = plot_embedding(run.path / "embedding.png", model, dataset.x_test, labels, names, title)
    if model.optimizer is not None and not model.optimizer.built:
        # A compiled-only model's optimizer has no state yet; building it makes the saved
        # state match what load_model rebuilds, which otherwise warns on every reload.
        model.optimizer.build(model.trainable_variables)
    model.save(run.path / models.MODEL_FILE_NAME)

    trainable = sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)  # Keras counts only the total
    validation_losses = epochs.get("val_loss", [])
    metrics = {
        "script": run.script_name,
        "run": run.final_path.name,
        "test_accuracy": accuracy,
        "test_loss": test_loss,
        "macro_f1": float(report["macro avg"]["f1-score"]),
        "per_class": {
            name: {
                "precision": float(report[name]["precision"]),
                "recall": float(report[name]["recall"]),
                "f1": float(report[name]["f1-score"]),
                "support": int(report[name]["support"]),
                **areas[name],
            }
            for name in names
        },
        "best_val_accuracy": float(max(epochs["val_accuracy"])) if epochs.get("val_accuracy") else None,
        "best_val_loss": float(min(validation_losses)) if validation_losses else None,
        "best_epoch": int(np.argmin(validation_losses)) + 1 if validation_losses else None,
        "epochs_run": len(epochs.get("loss", [])),
        "seconds": {**{k: round(v, 2) for k, v in run.seconds.items()}, "total": round(run.elapsed(), 2)},
        "hyperparameters": settings["hyperparameters"],
        "seed": settings["hyperparameters"].get("SEED"),
        "subset": settings["subset"],
        "mixed_precision": settings["mixed_precision"],
        "data": dataset.summary(),
        "weights": settings["weights"],
        "model": {"name": model.name, "trainable_parameters": trainable, "total_parameters": model.count_params()},
        "environment": {**runs.environment(), "variable_placement": distribute.variable_placement(model)},
        "confusion_matrix": {"counts": counts.tolist(), "normalised_by_true_class": normalised.tolist()},
        "embedding": {"test_images": embedding_points},
        **(notes or {}),
    }
    (run.path / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_report_markdown(run.path / "report.md", metrics, report_text, title)
    final_path = run.finish()
    print(f"Run folder: {final_path}")
    print(f"Test accuracy: {metrics['test_accuracy']:.4f} (macro-F1 {metrics['macro_f1']:.4f}, "
          f"{len(labels)} test images, {metrics['seconds']['total']:.0f} s)")
    return metrics


def _write_history(path, histories):
    """history.csv, one row per epoch in order, phases numbered from 1."""
    keys = sorted({key for h in histories for key in h.history})
    rows = [",".join(["epoch", "phase", *keys])]
    epoch = 0
    for phase, h in enumerate(histories, start=1):
        for index in range(len(h.history.get("loss", []))):
            values = [h.history[key][index] if index < len(h.history.get(key, [])) else "" for key in keys]
            rows.append(",".join(map(str, [epoch, phase, *values])))
            epoch += 1
    path.write_text("\n".join(rows) + "\n")


def _write_predictions(path, labels, predicted, confidence, names):
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["test_index", "true_class", "predicted_class", "confidence"])
        for index, (true, guess, score) in enumerate(zip(labels, predicted, confidence)):
            writer.writerow([index, names[true], names[guess], f"{score:.6f}"])


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


def confusion_matrices(labels, predicted, num_classes):
    """(counts, normalised): rows are true classes; a normalised row holds the share of that
    class's test images given each prediction (all zeros for a class with no test image)."""
    counts = sk_metrics.confusion_matrix(labels, predicted, labels=list(range(num_classes)))
    return counts, counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


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
    each captioned with the predicted class and its probability."""
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    rows = len(class_names)
    figure = Figure(figsize=(1.9 * per_class + 1.4, 1.75 * rows + 0.8))
    grid = figure.subplots(rows, per_class, squeeze=False)
    for row, name in enumerate(class_names):
        wrong = np.flatnonzero((labels == row) & (predicted != row))
        wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:per_class]
        for column in range(per_class):
            axes = grid[row, column]
            axes.set_xticks([])
            axes.set_yticks([])
            for spine in axes.spines.values():
                spine.set_visible(False)
            if column < len(wrong):
                index = wrong[column]
                axes.imshow(images[index], interpolation="nearest")
                axes.set_title(f"{class_names[predicted[index]]} {confidence[index]:.0%}\n(test #{index})",
                               fontsize=7.5, color="firebrick")
        grid[row, 0].set_ylabel(name, fontsize=9, rotation=0, ha="right", va="center")
    figure.suptitle(f"Most confident mistakes per true class (row): predicted class and probability\n{title}",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


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


def write_model_summary(path, model):
    """Keras's own `model.summary()`, nested models opened and each layer's trainability shown."""
    lines = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), expand_nested=True,
                  show_trainable=True, line_length=120)
    path.write_text("\n".join(lines) + "\n")


# The embedding picture's budget: at most this many test images, and the model's passes over
# them stop after FORWARD_SECONDS, so that the picture adds at most about 10 s to a run (t-SNE on
# 1,000 points takes 2 to 3 s on 2 cores).
EMBEDDING_IMAGES = 1000
FORWARD_SECONDS = 4.0


def plot_embedding(path, model, images, labels, class_names, title, seed=0):
    """embedding.png: what the head's last hidden layer makes of the test images, projected to
    2-D with PCA and with t-SNE (on PCA's 50 first components), coloured by class, with a few
    thumbnails. At most EMBEDDING_IMAGES images, drawn at random, fewer if the model's passes
    reach FORWARD_SECONDS; the picture says how many.

    Returns:
        How many test images the picture shows.
    """
    order = np.random.default_rng(seed).permutation(len(labels))[:EMBEDDING_IMAGES]
    last_dense = [layer for layer in activations.all_layers(model) if isinstance(layer, keras.layers.Dense)][-1]
    started, parts = time.perf_counter(), []
    for start in range(0, len(order), 200):
        rows = np.sort(order[start:start + 200])
        parts.append((rows, activations.first_calls(model, [last_dense], images[rows], received=True)[0]))
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


def write_report_markdown(path, metrics, report_text, title):
    """report.md: the run's figures and pictures on one page, readable on GitHub."""
    rows = "\n".join(
        f"| {name} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | "
        f"{'' if c['average_precision'] is None else format(c['average_precision'], '.3f')} | "
        f"{'' if c['roc_auc'] is None else format(c['roc_auc'], '.3f')} | {c['support']} |"
        for name, c in metrics["per_class"].items()
    )
    environment = metrics["environment"]
    hyperparameters = ", ".join(f"`{name}={value}`" for name, value in metrics["hyperparameters"].items())
    distribution = environment.get("distribution")
    parallel = f", data-parallel over {distribution['replicas']} devices" if distribution else ""
    path.write_text(f"""# {title}

Test accuracy **{metrics['test_accuracy']:.2%}**, macro-F1 {metrics['macro_f1']:.2%}, on
{metrics['data']['test_images']} test images; best validation accuracy
{metrics['best_val_accuracy']:.2%} (epoch {metrics['best_epoch']} of {metrics['epochs_run']}).
Model `{metrics['model']['name']}`: {metrics['model']['trainable_parameters']:,} trainable of
{metrics['model']['total_parameters']:,} parameters. Wall time {metrics['seconds']['total']:.1f} s on
{environment['device']} ({environment['machine']}), Keras backend {environment['backend']}{parallel}.

Hyperparameters: {hyperparameters}. Weights: {metrics['weights']}.

## Per class

| class | precision | recall | F1 | average precision | ROC AUC | test images |
|---|---|---|---|---|---|---|
{rows}

## Training

![loss and accuracy per epoch](loss_plot.png)

## Confusion matrix

![confusion matrix](confusion_matrix.png)

## Precision-recall and ROC curves

![precision-recall curves](pr_curves.png)

![ROC curves](roc_curves.png)

## Most confident mistakes

![most confident mistakes](mistakes.png)

## The model

![the model, layer by layer, trained and frozen](architecture.png)

Keras's summary of it is in `model_summary.txt`.

## The test images as the head sees them

![embedding of the head's last hidden layer](embedding.png)

## scikit-learn's classification report

```
{report_text}```
""")
