"""Evaluation on the test set and every file of a run folder.

All test figures come from one unshuffled pass of the whole saved model over the test
images, so predictions and labels are aligned by construction; the classification report,
metrics.json and predictions.csv are all computed from that one pass.
"""

import csv
import json

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # Files only; no display is needed or wanted.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as sk_metrics  # noqa: E402

from vgg_transfer import model as models  # noqa: E402
from vgg_transfer import distribute, runs  # noqa: E402


def predict_test_set(classifier, dataset, batch_size, verbose=0):
    """Class probabilities (N_test, num_classes) for the test images, in their stored order."""
    return distribute.predict(classifier, dataset.x_test, batch_size, verbose).astype(np.float64)


def cross_entropy(probabilities, labels):
    """Mean categorical cross-entropy, with Keras's clipping (epsilon 1e-7)."""
    chosen = probabilities[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(chosen, 1e-7, 1.0))))


def finish_run(run, classifier, dataset, history, config, weights, extra=None, test_probabilities=None):
    """Evaluates `classifier` on the test set, writes every report file and publishes the run.

    Args:
        run: the `runs.Run` being written; it is renamed to its final name at the end.
        classifier: the whole model (raw uint8 images in, class probabilities out), with
            its best weights.
        dataset: the `data.Dataset` it was trained on.
        history: the `keras.callbacks.History` of training (or a list of them, in order).
        config: the resolved configuration from `cli.parse_config`.
        weights: the `model.Weights` used, for the record.
        extra: more entries for metrics.json.
        test_probabilities: the classifier's test-set probabilities if the caller has them
            (see `features.whole_model_test_probabilities`); else the classifier predicts.

    Returns:
        The metrics dict that was written to metrics.json.
    """
    verbose = 0 if config.quiet else "auto"
    with run.timed("evaluation"):
        probabilities = test_probabilities
        if probabilities is None:
            probabilities = predict_test_set(classifier, dataset, config.batch_size, verbose)
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    labels = dataset.y_test
    names = list(dataset.class_names)
    label_ids = list(range(len(names)))

    report_text = sk_metrics.classification_report(
        labels, predicted, labels=label_ids, target_names=names, digits=4, zero_division=0
    )
    report = sk_metrics.classification_report(
        labels, predicted, labels=label_ids, target_names=names, output_dict=True, zero_division=0
    )
    (run.path / "classification_report.txt").write_text(
        f"{run.script_name}: test set, {len(labels)} images, model {models.MODEL_FILE_NAME}\n\n{report_text}"
    )
    _write_predictions(run.path / "predictions.csv", labels, predicted, confidence, names)

    histories = history if isinstance(history, list) else [history]
    epochs = {key: [value for h in histories for value in h.history.get(key, [])]
              for key in ("loss", "val_loss", "accuracy", "val_accuracy")}
    phase_starts = list(np.cumsum([len(h.history.get("loss", [])) for h in histories])[:-1])
    _write_history(run.path / "history.csv", histories)
    run_title = f"{run.script_name}: {run.final_path.name}"
    plot_loss(run.path / "loss_plot.png", epochs, run_title, phase_starts)
    counts, normalised = confusion_matrices(labels, predicted, len(names))
    plot_confusion_matrix(
        run.path / "confusion_matrix.png", counts, normalised, names,
        f"{run_title}, test accuracy {float(np.mean(predicted == labels)):.2%}",
    )
    areas = plot_pr_and_roc_curves(run.path, probabilities, labels, names, run_title)
    plot_confident_mistakes(run.path / "mistakes.png", dataset.x_test, labels, probabilities, names, run_title)
    if classifier.optimizer is not None and not classifier.optimizer.built:
        # A compiled-only model's optimizer has no state yet; building it makes the saved
        # state match what load_model rebuilds, which otherwise warns on every reload.
        classifier.optimizer.build(classifier.trainable_variables)
    classifier.save(run.path / models.MODEL_FILE_NAME)

    trainable, total = models.count_parameters(classifier)
    best_epoch = int(np.argmin(epochs["val_loss"])) if epochs["val_loss"] else None
    metrics = {
        "script": run.script_name,
        "run": run.final_path.name,
        "test_accuracy": float(np.mean(predicted == labels)),
        "test_loss": cross_entropy(probabilities, labels),
        "macro_f1": float(report["macro avg"]["f1-score"]),
        "per_class": {
            name: {
                "precision": float(report[name]["precision"]),
                "recall": float(report[name]["recall"]),
                "f1": float(report[name]["f1-score"]),
                "support": int(report[name]["support"]),
                "average_precision": areas[name]["average_precision"],
                "roc_auc": areas[name]["roc_auc"],
            }
            for name in names
        },
        "best_val_accuracy": float(max(epochs["val_accuracy"])) if epochs["val_accuracy"] else None,
        "best_val_loss": float(min(epochs["val_loss"])) if epochs["val_loss"] else None,
        "best_epoch": None if best_epoch is None else best_epoch + 1,
        "epochs_run": len(epochs["loss"]),
        "seconds": {**{k: round(v, 2) for k, v in run.seconds.items()}, "total": round(run.elapsed(), 2)},
        "hyperparameters": config.hyperparameters,
        "seed": config.seed,
        "subset": config.subset,
        "mixed_precision": config.mixed_precision,
        "data": dataset.summary(),
        "weights": weights.source,
        "model": {"name": classifier.name, "trainable_parameters": trainable, "total_parameters": total},
        "environment": {**runs.environment(), "variable_placement": distribute.variable_placement(classifier)},
        "confusion_matrix": {"counts": counts.tolist(), "normalised_by_true_class": normalised.tolist()},
        **(extra or {}),
    }
    (run.path / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_report_markdown(run.path / "report.md", metrics, report_text, run_title)
    final_path = run.finish()
    print(f"Run folder: {final_path}")
    print(f"Test accuracy: {metrics['test_accuracy']:.4f} (macro-F1 {metrics['macro_f1']:.4f}, "
          f"{len(labels)} test images, {metrics['seconds']['total']:.0f} s)")
    return metrics


def _write_history(path, histories):
    """history.csv from the histories, one row per epoch in order (phases numbered from 1).

    Rewrites the CSVLogger's live file, which repeats epochs where a run was interrupted
    and resumed."""
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
    """Training and validation loss (left) and accuracy (right) per epoch.

    `phase_starts` are the numbers of epochs done before each later phase began; each is
    marked with a dashed line.
    """
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for axes, key, label in ((loss_axes, "loss", "cross-entropy loss"), (accuracy_axes, "accuracy", "accuracy")):
        for prefix, name in (("", "training"), ("val_", "validation")):
            values = epochs.get(prefix + key) or []
            axes.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=name)
        for number, start in enumerate(phase_starts, start=2):
            axes.axvline(start + 0.5, color="grey", linestyle="--", linewidth=1)
            axes.annotate(f"phase {number}", (start + 0.6, 1), xycoords=("data", "axes fraction"),
                          va="top", fontsize=8, color="grey")
        axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend()
    loss_axes.set_title("Loss")
    accuracy_axes.set_title("Accuracy")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def confusion_matrices(labels, predicted, num_classes):
    """(counts, normalised): rows are true classes; a normalised row holds the share of that
    class's test images given each prediction (all zeros for a class with no test image)."""
    counts = sk_metrics.confusion_matrix(labels, predicted, labels=list(range(num_classes)))
    return counts, counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def plot_confusion_matrix(path, matrix, normalised, class_names, title):
    """Counts (left) and rows normalised to recall (right); rows are true classes."""
    size = max(5.0, 0.55 * len(class_names) + 2.5)
    figure, panels = plt.subplots(1, 2, figsize=(2 * size + 1, size))
    for axes, values, subtitle, fmt in (
        (panels[0], matrix, "counts", "d"),
        (panels[1], normalised, "normalised by true class", ".2f"),
    ):
        image = axes.imshow(values, cmap="Blues")
        figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
        ticks = np.arange(len(class_names))
        axes.set_xticks(ticks, class_names, rotation=45, ha="right")
        axes.set_yticks(ticks, class_names)
        axes.set_xlabel("predicted class")
        axes.set_ylabel("true class")
        axes.set_title(subtitle)
        if len(class_names) <= 20:
            threshold = values.max() / 2 if values.max() else 1
            for row in range(len(class_names)):
                for column in range(len(class_names)):
                    axes.text(column, row, format(values[row, column], fmt), ha="center", va="center", fontsize=7,
                              color="white" if values[row, column] > threshold else "black")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_pr_and_roc_curves(folder, probabilities, labels, class_names, title):
    """pr_curves.png (precision-recall per class) and roc_curves.png (one-vs-rest ROC per class).

    Returns:
        dict class name -> {"average_precision", "roc_auc"} (None for a class absent from the labels).
    """
    areas = {}
    figures = {kind: plt.subplots(figsize=(7.5, 6)) for kind in ("pr", "roc")}
    colours = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for index, name in enumerate(class_names):
        truth = labels == index
        scores = probabilities[:, index]
        if not truth.any() or truth.all():
            areas[name] = {"average_precision": None, "roc_auc": None}
            continue
        precision, recall, _ = sk_metrics.precision_recall_curve(truth, scores)
        false_positive_rate, true_positive_rate, _ = sk_metrics.roc_curve(truth, scores)
        areas[name] = {
            "average_precision": float(sk_metrics.average_precision_score(truth, scores)),
            "roc_auc": float(sk_metrics.auc(false_positive_rate, true_positive_rate)),
        }
        colour = colours(index % colours.N)
        figures["pr"][1].plot(recall, precision, color=colour,
                              label=f"{name} (AP {areas[name]['average_precision']:.3f})")
        figures["roc"][1].plot(false_positive_rate, true_positive_rate, color=colour,
                               label=f"{name} (AUC {areas[name]['roc_auc']:.3f})")
    pr_axes, roc_axes = figures["pr"][1], figures["roc"][1]
    roc_axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="chance")
    for axes, x_label, y_label, subtitle in (
        (pr_axes, "recall", "precision", "Precision-recall per class (test set)"),
        (roc_axes, "false positive rate", "true positive rate", "ROC per class, one vs rest (test set)"),
    ):
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1.02)
        axes.set_xlabel(x_label)
        axes.set_ylabel(y_label)
        axes.set_title(f"{subtitle}\n{title}", fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="lower left" if axes is pr_axes else "lower right")
    for kind, file_name in (("pr", "pr_curves.png"), ("roc", "roc_curves.png")):
        figure = figures[kind][0]
        figure.tight_layout()
        figure.savefig(folder / file_name, dpi=110)
        plt.close(figure)
    return areas


MISTAKES_PER_CLASS = 5


def plot_confident_mistakes(path, images, labels, probabilities, class_names, title, per_class=MISTAKES_PER_CLASS):
    """A grid of the most confident mistakes: one row per true class, up to `per_class` images,
    each captioned with the predicted class and its probability."""
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    rows = len(class_names)
    figure, grid = plt.subplots(rows, per_class, figsize=(1.9 * per_class + 1.4, 1.75 * rows + 0.8), squeeze=False)
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
        grid[row, 0].yaxis.set_visible(True)
    figure.suptitle(f"Most confident mistakes per true class (row): predicted class and probability\n{title}",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


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

## scikit-learn's classification report

```
{report_text}```
""")
