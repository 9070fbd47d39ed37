"""Every file of a run folder: the test-set report, metrics.json, the saved model, and (through
`pictures`) its pictures.

All test figures come from one unshuffled pass over the test images (the `test_predictions`
a script passes in), so predictions and labels are aligned by construction; the
classification report, metrics.json and predictions.csv are all computed from that one pass.
"""

import csv
import json

import keras
import numpy as np
from sklearn import metrics as sk_metrics

from vgg_transfer import distribute, pictures, runs, saved_models


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


def write_run(run, model, dataset, history, test_predictions, notes=None, head_on_features=None):
    """Writes every file of a run, saves its model, and publishes the run folder.

    Args:
        run: the `runs.Run` being written; it is renamed to its final name at the end.
        model: the whole model to save (raw uint8 images in), compiled with the loss it was
            trained with, and with its best weights.
        dataset: the `data.Dataset` it was trained on.
        history: the `History` that `fit` returned (or a list of them, one per phase).
        test_predictions: the model's outputs on `dataset.x_test`, in order (N_test, classes).
        notes: more entries for metrics.json (the API, the strategy...).
        head_on_features: (head, the cached features of `dataset.x_test`) where the script trained
            `model`'s head on cached features: the embedding picture then runs the head on them
            instead of pushing the test images through VGG16 again (the same values, checked by
            `features.predict_with_cached_features`; on a rerun, most of the picture's time).

    Returns:
        The metrics dict that was written to metrics.json.
    """
    folder, names, labels = run.path, list(dataset.class_names), dataset.y_test
    probabilities, test_loss = probabilities_and_loss(model, labels, test_predictions)
    predicted = probabilities.argmax(axis=1)
    histories = history if isinstance(history, list) else [history]
    epochs = {key: [value for h in histories for value in h.history.get(key, [])]
              for key in sorted({key for h in histories for key in h.history})}
    title = f"{run.script_name}: {run.final_path.name}"
    counts, normalised = confusion_matrices(labels, predicted, len(names))

    report = write_classification_report(folder / "classification_report.txt", labels, predicted, names, title)
    write_predictions(folder / "predictions.csv", labels, predicted, probabilities.max(axis=1), names)
    write_history(folder / "history.csv", histories)
    pictures.plot_loss(folder / "loss_plot.png", epochs, title,
                       phase_starts=list(np.cumsum([len(h.history.get("loss", [])) for h in histories])[:-1]))
    pictures.plot_confusion_matrix(folder / "confusion_matrix.png", counts, normalised, names,
                                   f"{title}, test accuracy {np.mean(predicted == labels):.2%}")
    areas = pictures.plot_pr_and_roc_curves(folder, probabilities, labels, names, title)  # pr_curves, roc_curves
    pictures.plot_confident_mistakes(folder / "mistakes.png", dataset.x_test, labels, probabilities, names, title)
    pictures.plot_architecture(folder / "architecture.png", model, title)
    write_model_summary(folder / "model_summary.txt", model)
    with run.timed("embedding"):
        embedder, inputs = head_on_features or (model, dataset.x_test)
        embedded = pictures.plot_embedding(folder / "embedding.png", embedder, inputs, dataset.x_test, labels, names,
                                           title)
    save_model(folder / saved_models.MODEL_FILE_NAME, model)
    metrics = run_metrics(run, model, dataset, epochs, predicted, test_loss, report, areas, counts, normalised,
                          embedded, notes)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_report_markdown(folder / "report.md", metrics, report["text"], title)

    final_path = run.finish()
    print(f"Run folder: {final_path}")
    print(f"Test accuracy: {metrics['test_accuracy']:.4f} (macro-F1 {metrics['macro_f1']:.4f}, "
          f"{len(labels)} test images, {metrics['seconds']['total']:.0f} s)")
    return metrics


def write_classification_report(path, labels, predicted, names, title):
    """scikit-learn's classification report as text (written to `path`) and as a dict ("text" added)."""
    arguments = {"labels": range(len(names)), "target_names": names, "zero_division": 0}
    text = sk_metrics.classification_report(labels, predicted, digits=4, **arguments)
    path.write_text(f"{title}: test set, {len(labels)} images, model {saved_models.MODEL_FILE_NAME}\n\n{text}")
    return {**sk_metrics.classification_report(labels, predicted, output_dict=True, **arguments), "text": text}


def save_model(path, model):
    """`model.save(path)`, its optimizer built first: a compiled-only model's optimizer has no
    state yet, and the saved state must match what load_model rebuilds, or every reload warns."""
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.save(path)


def run_metrics(run, model, dataset, epochs, predicted, test_loss, report, areas, counts, normalised, embedded,
                notes):
    """What metrics.json holds: the test figures, the training's, the settings and the environment."""
    setup, names = run.setup, list(dataset.class_names)
    trainable = sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)  # Keras counts only the total
    validation_losses = epochs.get("val_loss", [])
    return {
        "script": run.script_name,
        "run": run.final_path.name,
        "test_accuracy": float(np.mean(predicted == dataset.y_test)),
        "test_loss": test_loss,
        "macro_f1": float(report["macro avg"]["f1-score"]),
        "per_class": {name: {"precision": float(report[name]["precision"]), "recall": float(report[name]["recall"]),
                             "f1": float(report[name]["f1-score"]), "support": int(report[name]["support"]),
                             **areas[name]} for name in names},
        "best_val_accuracy": float(max(epochs["val_accuracy"])) if epochs.get("val_accuracy") else None,
        "best_val_loss": float(min(validation_losses)) if validation_losses else None,
        "best_epoch": int(np.argmin(validation_losses)) + 1 if validation_losses else None,
        "epochs_run": len(epochs.get("loss", [])),
        "seconds": {**{k: round(v, 2) for k, v in run.seconds.items()}, "total": round(run.elapsed(), 2)},
        "hyperparameters": setup.hyperparameters,
        "seed": setup.hyperparameters.get("SEED"),
        "subset": setup.subset,
        "precision": {"name": setup.hyperparameters.get("PRECISION"), "reason": setup.precision_reason,
                      "dtype_policy": keras.config.dtype_policy().name},
        "data": dataset.summary(),
        "weights": setup.weights_source,
        "model": {"name": model.name, "trainable_parameters": trainable, "total_parameters": model.count_params()},
        "environment": {**runs.environment(setup.distribution),
                        "variable_placement": distribute.variable_placement(model)},
        "confusion_matrix": {"counts": counts.tolist(), "normalised_by_true_class": normalised.tolist()},
        "embedding": {"test_images": embedded},
        "checks": run.checks,
        **(notes or {}),
    }


def write_history(path, histories):
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


def write_predictions(path, labels, predicted, confidence, names):
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["test_index", "true_class", "predicted_class", "confidence"])
        for index, (true, guess, score) in enumerate(zip(labels, predicted, confidence)):
            writer.writerow([index, names[true], names[guess], f"{score:.6f}"])


def confusion_matrices(labels, predicted, num_classes):
    """(counts, normalised): rows are true classes; a normalised row holds the share of that
    class's test images given each prediction (all zeros for a class with no test image)."""
    counts = sk_metrics.confusion_matrix(labels, predicted, labels=list(range(num_classes)))
    return counts, counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def write_model_summary(path, model):
    """Keras's own `model.summary()`, nested models opened and each layer's trainability shown."""
    lines = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line), expand_nested=True,
                  show_trainable=True, line_length=120)
    path.write_text("\n".join(lines) + "\n")


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
