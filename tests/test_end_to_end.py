"""The main job end to end on a real subset of the shared CIFAR-10 with the shared ImageNet weights.

Calibration of the transfer margin (2,000 training images, 400 test images, 15 epochs,
this 2-core machine, TensorFlow backend, seeds 1 and 2): the pretrained base gave 66.5%
and 66.8% test accuracy, the randomly initialised one 26.8% and 33.0%. The test asks for
a margin of at least 20 points, about half of the smallest gap seen, and at least 50% for
the pretrained base (chance is 10%).
"""

import csv
import json
import re
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

import transfer_learning
from vgg_transfer import cli, data, features

SUBSET = 2000
EPOCHS = 15
TRANSFER_MARGIN = 0.20
MIN_PRETRAINED_ACCURACY = 0.50
pytestmark = pytest.mark.slow  # every test here uses a trained run


def _run_main(out_dir, archive, weights, *extra):
    argv = ["--data", str(archive), "--weights", str(weights), "--subset", str(SUBSET), "--epochs", str(EPOCHS),
            "--out", str(out_dir), "--quiet", "--precision", "float32", *extra]
    assert cli.run(transfer_learning.main, vars(transfer_learning), argv) == 0
    return sorted(p for p in (out_dir / "transfer_learning").iterdir() if not p.name.startswith("."))


@pytest.fixture(scope="module")
def pretrained_run(shared_data, tmp_path_factory):
    archive, weights = shared_data
    out_dir = tmp_path_factory.mktemp("out-pretrained")
    (run_dir,) = _run_main(out_dir, archive, weights, "--tensorboard")
    return run_dir


@pytest.fixture(scope="module")
def test_set(shared_data):
    """The test images of the runs above: same data, seed and subset."""
    values, _ = cli.parse("", cli.constants(vars(transfer_learning)), ["--subset", str(SUBSET)])
    return data.load_dataset(shared_data[0], values["VALIDATION_SPLIT"], values["TEST_SPLIT"], values["SEED"], SUBSET, verbose=False)


def _metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def test_pretrained_features_beat_random_init_by_a_clear_margin(pretrained_run, shared_data, tmp_path):
    (random_run,) = _run_main(tmp_path, shared_data[0], "none")
    pretrained, random = _metrics(pretrained_run)["test_accuracy"], _metrics(random_run)["test_accuracy"]
    assert pretrained >= MIN_PRETRAINED_ACCURACY
    assert pretrained - random >= TRANSFER_MARGIN, (pretrained, random)
    assert _metrics(random_run)["weights"].startswith("none")


def test_accuracy_agrees_across_report_metrics_predictions_and_evaluate(pretrained_run, test_set):
    metrics = _metrics(pretrained_run)
    report = (pretrained_run / "classification_report.txt").read_text()
    report_accuracy = float(re.search(r"^\s*accuracy\s+([0-9.]+)\s+(\d+)$", report, re.M).group(1))
    with open(pretrained_run / "predictions.csv") as file:
        rows = list(csv.DictReader(file))
    csv_accuracy = np.mean([row["true_class"] == row["predicted_class"] for row in rows])
    model = keras.saving.load_model(pretrained_run / "model.keras")
    evaluate_loss, evaluate_accuracy = model.evaluate(test_set.x_test, test_set.y_test, batch_size=256, verbose=0)

    assert len(rows) == len(test_set.y_test) == metrics["data"]["test_images"]
    assert [row["true_class"] for row in rows] == [test_set.class_names[y] for y in test_set.y_test]
    assert report_accuracy == pytest.approx(metrics["test_accuracy"], abs=5e-5)
    assert csv_accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-9)
    assert evaluate_accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert evaluate_loss == pytest.approx(metrics["test_loss"], rel=1e-3)
    per_class_recall = np.mean([entry["recall"] for entry in metrics["per_class"].values()])
    assert per_class_recall == pytest.approx(metrics["test_accuracy"], abs=1e-9)  # balanced test subset
    # The confusion matrix: its diagonal holds the correct predictions, its rows the classes'
    # test images, and its normalised rows are the per-class recalls.
    counts = np.array(metrics["confusion_matrix"]["counts"])
    normalised = np.array(metrics["confusion_matrix"]["normalised_by_true_class"])
    assert counts.sum() == len(rows) and np.trace(counts) / counts.sum() == pytest.approx(metrics["test_accuracy"])
    assert list(counts.sum(axis=1)) == [metrics["per_class"][name]["support"] for name in test_set.class_names]
    np.testing.assert_allclose(normalised.sum(axis=1), 1.0)
    np.testing.assert_allclose(np.diag(normalised), [metrics["per_class"][name]["recall"]
                                                     for name in test_set.class_names])


def test_saved_model_predicts_on_raw_uint8_images(pretrained_run, test_set):
    model = keras.saving.load_model(pretrained_run / "model.keras")
    assert model.input.dtype == "uint8"
    probabilities = model.predict(test_set.x_test[:64], verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    with open(pretrained_run / "predictions.csv") as file:
        rows = list(csv.DictReader(file))[:64]
    assert [test_set.class_names[i] for i in probabilities.argmax(axis=1)] == [row["predicted_class"] for row in rows]
    np.testing.assert_allclose(probabilities.max(axis=1), [float(row["confidence"]) for row in rows], atol=1e-5)


def test_run_folder_holds_every_report(pretrained_run):
    metrics = _metrics(pretrained_run)
    pictures = {"loss_plot.png", "confusion_matrix.png", "pr_curves.png", "roc_curves.png", "mistakes.png",
                "architecture.png", "embedding.png"}
    for name in pictures:
        with Image.open(pretrained_run / name) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 300
    # report.md shows every picture of the run, and only pictures that exist.
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (pretrained_run / "report.md").read_text())
    assert set(linked) == pictures
    # The embedding has a point for each test image (400 here: fewer than its limit of 1,000).
    assert metrics["embedding"]["test_images"] == metrics["data"]["test_images"] == 400
    summary = (pretrained_run / "model_summary.txt").read_text()
    assert "block4_conv3" in summary and "Trainable" in summary and f"{metrics['model']['total_parameters']:,}" in summary
    # The curves' areas are real outcomes: well above chance (0.5 AUC) for a pretrained base,
    # and average precision never above what a perfect ranking (1.0) gives.
    per_class = metrics["per_class"].values()
    assert np.mean([c["roc_auc"] for c in per_class]) > 0.85
    assert all(0 < c["average_precision"] <= 1 for c in per_class)
    with open(pretrained_run / "history.csv") as file:
        history = list(csv.DictReader(file))
    assert len(history) == metrics["epochs_run"] >= 1
    assert min(float(row["val_loss"]) for row in history) == pytest.approx(metrics["best_val_loss"], rel=1e-6)
    assert (pretrained_run / "checkpoints" / "best.keras").is_file()
    # The figures come from the head on cached features; the whole model agreed on 64 test images.
    check = metrics["checks"]["cached_features"]
    assert check["test_images_checked"] == features.VERIFIED_TEST_IMAGES == 64 and check["largest_difference"] <= 1e-5, check
    assert set(metrics["seconds"]) >= {"data", "features", "training", "evaluation", "total"}
    assert metrics["hyperparameters"]["FEATURE_LAYER"] == "block4_pool" and metrics["seed"] == 42
    assert metrics["environment"]["backend"] == keras.config.backend()
    import subprocess

    from conftest import PROJECT_ROOT

    head = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # the code that made the run: a clone's commit
        assert metrics["environment"]["code"]["commit"] == head.stdout.strip()
    assert 0 < metrics["macro_f1"] <= 1 and metrics["data"]["train_images"] + metrics["data"]["validation_images"] == SUBSET


def test_tensorboard_holds_every_epochs_figures(pretrained_run):
    """--tensorboard: the logs that TensorBoard (`tensorboard --logdir RUN/tensorboard`) shows,
    read back with its own reader, hold the loss of every epoch, as history.csv does."""
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator

    with open(pretrained_run / "history.csv") as file:
        history = list(csv.DictReader(file))
    for split, key in (("train", "loss"), ("validation", "val_loss")):
        logs = event_accumulator.EventAccumulator(str(pretrained_run / "tensorboard" / "training" / split),
                                                  size_guidance={"tensors": 0}).Reload()
        events = logs.Tensors("epoch_loss")
        assert [event.step for event in events] == list(range(len(history))), split
        np.testing.assert_allclose([float(tf.make_ndarray(event.tensor_proto)) for event in events],
                                   [float(row[key]) for row in history], rtol=1e-6)


def test_rerun_reads_cached_features_and_never_overwrites(pretrained_run, shared_data):
    before = (pretrained_run / "metrics.json").read_bytes()
    runs = _run_main(pretrained_run.parent.parent, *shared_data)
    assert len(runs) == 2 and pretrained_run in runs
    (rerun,) = [run for run in runs if run != pretrained_run]
    assert _metrics(rerun)["features_from_cache"] is True
    assert (pretrained_run / "metrics.json").read_bytes() == before
    # Same seed, same cached features: the same model, figure for figure, on a CPU.
    for key in ("test_accuracy", "test_loss", "macro_f1", "per_class", "best_val_loss", "epochs_run"):
        assert _metrics(rerun)[key] == _metrics(pretrained_run)[key], key
    assert (rerun / "predictions.csv").read_bytes() == (pretrained_run / "predictions.csv").read_bytes()


def test_predict_classifies_any_image_and_reports_unreadable_ones(pretrained_run, test_set, tmp_path):
    import subprocess
    import sys

    from conftest import PROJECT_ROOT

    rng = np.random.default_rng(0)
    Image.fromarray(test_set.x_test[0]).save(tmp_path / "test0.png")  # lossless: the model saw these pixels
    Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)).save(tmp_path / "wide.jpg")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "grey16.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)).save(tmp_path / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (64, 64)).astype(np.uint16)).save(tmp_path / "deep16bit.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "src" / "predict.py"), str(tmp_path), "--model", str(pretrained_run),
         "--json"], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1  # one file failed, the others were classified
    assert "broken.png: not a readable image" in result.stderr and "Traceback" not in result.stderr
    predictions = {Path(item["path"]).name: item["top"] for item in json.loads(result.stdout)["predictions"]}
    assert set(predictions) == {"test0.png", "wide.jpg", "grey16.png", "rgba.png", "deep16bit.png"}
    for top in predictions.values():
        probabilities = [entry["probability"] for entry in top]
        assert len(top) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert all(0 <= p <= 1 for p in probabilities) and sum(probabilities) <= 1 + 1e-6
        assert {entry["class"] for entry in top} <= set(test_set.class_names)
    with open(pretrained_run / "predictions.csv") as file:
        first = next(csv.DictReader(file))
    assert predictions["test0.png"][0]["class"] == first["predicted_class"]
    assert predictions["test0.png"][0]["probability"] == pytest.approx(float(first["confidence"]), abs=1e-4)


# Loads a saved model with plain Keras, in a process that cannot import this project (run
# with `python -I` from another folder), and prints its predictions for the PNG files given.
PLAIN_KERAS = """
import json, sys
import keras, numpy as np
from PIL import Image
model = keras.saving.load_model(sys.argv[1])
images = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in sys.argv[2:]])
print(json.dumps(model.predict(images, verbose=0).tolist()))
"""


def plain_keras_predictions(model_file, image_files, cwd, backend="tensorflow"):
    import os
    import subprocess
    import sys

    environment = {**os.environ, "KERAS_BACKEND": backend, "CUDA_VISIBLE_DEVICES": ""}
    environment.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-I", "-c", PLAIN_KERAS, str(model_file), *map(str, image_files)],
                            capture_output=True, text=True, cwd=cwd, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.array(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_the_saved_model_loads_in_plain_keras_and_predicts_what_predict_py_does(pretrained_run, test_set,
                                                                                 tmp_path, backend):
    import importlib.util
    import subprocess
    import sys

    from conftest import PROJECT_ROOT

    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    files = []
    for index in range(6):
        files.append(tmp_path / f"test{index}.png")
        Image.fromarray(test_set.x_test[index]).save(files[-1])
    script = subprocess.run([sys.executable, str(PROJECT_ROOT / "src" / "predict.py"), *map(str, files),
                             "--model", str(pretrained_run), "--json", "--top", "10"],
                            capture_output=True, text=True, timeout=300)
    assert script.returncode == 0, script.stderr[-2000:]
    names = list(test_set.class_names)
    expected = np.zeros((len(files), len(names)))
    for row, item in enumerate(json.loads(script.stdout)["predictions"]):
        for entry in item["top"]:
            expected[row, names.index(entry["class"])] = entry["probability"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    plain = plain_keras_predictions(pretrained_run / "model.keras", files, elsewhere, backend)
    # The same model, here on another backend: equal up to the backends' float arithmetic.
    np.testing.assert_allclose(plain, expected, atol=1e-6 if backend == "tensorflow" else 1e-4)
    assert (plain.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_feature_maps_show_each_blocks_strongest_channels_at_the_layers_shape(pretrained_run, shared_data, tmp_path):
    import feature_maps

    feature_maps.main(feature_maps.parse_arguments(
        ["--model", str(pretrained_run), "--data", str(shared_data[0]), "--out", str(tmp_path), "--channels", "6"]))
    (folder,) = (tmp_path / "feature_maps").iterdir()
    pictures = sorted(folder.glob("feature_maps_*.png"))
    assert len(pictures) == 10  # one test image per class
    for picture in pictures:
        with Image.open(picture) as image:
            assert image.format == "PNG" and image.width >= 600
    with np.load(folder / "feature_maps.npz") as maps:  # the main job's base ends at block 4
        shapes = {name: maps[name].shape for name in maps.files}
    assert shapes == {"block1_conv2": (10, 32, 32, 6), "block2_conv2": (10, 16, 16, 6),
                      "block3_conv3": (10, 8, 8, 6), "block4_conv3": (10, 4, 4, 6)}


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="the reference uses TensorFlow's tape")
def test_feature_maps_and_gradcam_of_the_flip_model_come_from_each_images_own_pass(pretrained_run, test_set):
    """The main job's saved model runs each image and its mirror image through the same base:
    the maps recorded for a layer are the image's own, equal to a model cut at that layer (the
    mirror image's would be mirrored maps: these images are not left-right symmetric), and
    Grad-CAM equals a reference computed with the gradient tape through the image's own pass,
    at the layer's 4x4 resolution resized to the images' 32x32."""
    import tensorflow as tf

    from vgg_transfer import activations, gradcam

    model = keras.saving.load_model(pretrained_run / "model.keras")
    preprocessing, base, head = (model.get_layer(name) for name in ("vgg16_preprocessing", "vgg16_base", "head"))
    images = test_set.x_test[:8]
    preprocessed = preprocessing(images)
    for name in ("block2_conv2", "block4_conv3"):
        layer = base.get_layer(name)
        cut = keras.Model(base.input, layer.output)
        own, mirror = (keras.ops.convert_to_numpy(cut(x)) for x in (preprocessed, preprocessed[:, :, ::-1]))
        (recorded,) = activations.first_calls(model, [layer], images)
        np.testing.assert_allclose(recorded, own, rtol=1e-5, atol=1e-3)
        assert np.abs(recorded - mirror).max() > 100 * np.abs(recorded - own).max() + 1  # the check has teeth

    layer = base.get_layer("block4_conv3")
    maps, probabilities = gradcam.heatmaps(model, images, layer)
    classes = probabilities.argmax(axis=1)
    upper = keras.Model(layer.output, base.output)  # block4_pool, from block4_conv3's output
    mirror_probabilities = head(base(preprocessed[:, :, ::-1]))
    with tf.GradientTape() as tape:
        own = keras.Model(base.input, layer.output)(preprocessed)
        tape.watch(own)
        averaged = (head(upper(own)) + mirror_probabilities) / 2
        score = tf.reduce_sum(averaged * tf.one_hot(classes, averaged.shape[1]))
    gradients, own = tape.gradient(score, own).numpy(), own.numpy()
    cams = np.maximum((gradients.mean(axis=(1, 2), keepdims=True) * own).sum(axis=-1), 0)
    resized = np.maximum(tf.image.resize(cams[..., None], (32, 32), method="bilinear").numpy()[..., 0], 0)
    expected = resized / np.maximum(resized.max(axis=(1, 2), keepdims=True), 1e-12)
    assert maps.shape == (8, 32, 32) and (expected.max(axis=(1, 2)) == 1).sum() >= 6
    np.testing.assert_allclose(maps, expected, atol=1e-4)
    np.testing.assert_allclose(probabilities, averaged.numpy(), atol=1e-5)


def test_the_embedding_reads_the_same_hidden_layer_from_cached_features_as_from_images(pretrained_run, test_set):
    """The scripts draw the embedding from the head on the cached test features
    (`write_run(head_on_features=...)`), not from the whole model on the images: the head's
    last hidden layer must receive the same values either way."""
    from vgg_transfer import activations, pictures

    model = keras.saving.load_model(pretrained_run / "model.keras")
    preprocessing, base, head = (model.get_layer(name) for name in ("vgg16_preprocessing", "vgg16_base", "head"))
    images = test_set.x_test[:16]
    last_dense = pictures.embedded_layer(head)
    (from_images,) = activations.first_calls(model, [last_dense], images, received=True)
    features = keras.ops.convert_to_numpy(base(preprocessing(images)))
    (from_features,) = activations.first_calls(head, [last_dense], features, received=True)
    assert from_images.shape == (16, last_dense.kernel.shape[0])
    np.testing.assert_allclose(from_features, from_images, rtol=1e-4, atol=1e-4)
    (from_mirrors,) = activations.first_calls(head, [last_dense], features[:, :, ::-1], received=True)
    assert np.abs(from_mirrors - from_images).max() > 1e-2  # the comparison can tell two inputs apart


def test_export_names_a_missing_converter_and_never_writes_into_the_run(pretrained_run, tmp_path):
    import subprocess
    import sys

    from conftest import PROJECT_ROOT

    hidden = ("import os, sys, runpy; sys.modules['tf2onnx'] = None; sys.argv = sys.argv[1:]; "
              "sys.path.insert(0, os.path.dirname(sys.argv[0])); runpy.run_path(sys.argv[0], run_name='__main__')")
    export = str(PROJECT_ROOT / "src" / "export.py")
    missing, inside = (subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                       for command in ([sys.executable, "-c", hidden, export, str(pretrained_run), "--format", "onnx",
                                        "--out", str(tmp_path / "onnx")],
                                       [sys.executable, export, str(pretrained_run), "--format", "tf_saved_model",
                                        "--out", str(pretrained_run / "exported")]))  # side by side
    errors = missing.communicate(timeout=300)[1]
    assert missing.returncode == 2 and "Traceback" not in errors
    assert "export.py: error: exporting to onnx needs tf2onnx" in errors
    errors = inside.communicate(timeout=300)[1]
    assert inside.returncode == 2 and "is inside the run folder" in errors
    assert not (pretrained_run / "exported").exists()


def test_test_time_flip_averages_each_image_with_its_mirror_image(pretrained_run, shared_data, test_set, tmp_path):
    """The main job flips by default: its saved model averages each image's prediction with its
    mirror image's, as its reported figures do. The same run with --no-test-time-flip has the
    same head (same seed, cached features) and predicts the images alone."""
    archive, weights = shared_data
    argv = ["--data", str(archive), "--weights", str(weights), "--subset", str(SUBSET), "--epochs", str(EPOCHS),
            "--out", str(tmp_path), "--quiet", "--no-test-time-flip", "--precision", "float32"]
    assert cli.run(transfer_learning.main, vars(transfer_learning), argv) == 0
    (plain_run,) = (tmp_path / "transfer_learning").iterdir()
    plain = keras.saving.load_model(plain_run / "model.keras")
    model = keras.saving.load_model(pretrained_run / "model.keras")
    assert "mirror" in [layer.name for layer in model.layers] and "mirror" not in [layer.name for layer in plain.layers]
    images = test_set.x_test[:50]
    expected = (plain.predict(images, verbose=0) + plain.predict(images[:, :, ::-1], verbose=0)) / 2
    np.testing.assert_allclose(model.predict(images, verbose=0), expected, atol=1e-5)
    with open(pretrained_run / "predictions.csv") as file:
        rows = list(csv.DictReader(file))[:50]
    np.testing.assert_allclose(expected.max(axis=1), [float(row["confidence"]) for row in rows], atol=1e-4)
    assert _metrics(pretrained_run)["hyperparameters"]["TEST_TIME_FLIP"] is True
    assert _metrics(plain_run)["hyperparameters"]["TEST_TIME_FLIP"] is False
