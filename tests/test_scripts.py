"""The script collection in quick mode (tiny real subset, one or two epochs), freezing policies
checked by layer name, saved models of every API reloading, and the comparison table."""

import csv
import json

import keras
import numpy as np
import pytest

import baselines
import compare
import fine_tune
import transfer_learning_sequential
import transfer_learning_subclassed
from conftest import PROJECT_ROOT, interrupt_after_epochs
from vgg_transfer import activations, cli, data, models, saved_models
from vgg_transfer.errors import InputError

QUICK = ["--subset", "300", "--quiet", "--precision", "float32"]


def _run(script, out_dir, shared_data, *extra):
    archive, weights = shared_data
    argv = ["--data", str(archive), "--weights", str(weights), "--out", str(out_dir), *QUICK, *extra]
    assert cli.run(script.main, vars(script), argv, pretrained=script is not baselines) == 0  # as __main__ does
    name = script.__name__
    (run_dir,) = [p for p in (out_dir / name).iterdir() if not p.name.startswith(".")]
    return run_dir


def _test_images(script, shared_data):
    values, common = cli.parse("", cli.constants(vars(script)), QUICK)
    return data.load_dataset(shared_data[0], values["VALIDATION_SPLIT"], values["TEST_SPLIT"], values["SEED"], common["subset"], verbose=False)


def _assert_reloads_with_the_same_predictions(run_dir, dataset):
    model = keras.saving.load_model(run_dir / "model.keras")
    probabilities = model.predict(dataset.x_test, verbose=0)
    with open(run_dir / "predictions.csv") as file:
        rows = list(csv.DictReader(file))
    assert [dataset.class_names[i] for i in probabilities.argmax(axis=1)] == [row["predicted_class"] for row in rows]
    np.testing.assert_allclose(probabilities.max(axis=1), [float(row["confidence"]) for row in rows], atol=1e-4)
    return model


@pytest.fixture(scope="module")
def subclassed_run(shared_data, tmp_path_factory):
    return _run(transfer_learning_subclassed, tmp_path_factory.mktemp("subclassed"), shared_data,
                "--epochs", "6", "--batch-size", "32")


@pytest.fixture(scope="module")
def sequential_runs(shared_data, tmp_path_factory):
    """{policy flag: run folder} for both freezing policies."""
    return {policy: _run(transfer_learning_sequential, tmp_path_factory.mktemp("sequential"), shared_data,
                         "--epochs", "1", policy) for policy in ("--no-train-base", "--train-base")}


# Quick two-phase runs of both recipes on this CPU: "cached" is the CPU's as shipped (no recipe
# flag: block 4's last convolution trained on the cached activations of each image and its
# mirror image, with test-time flip averaging); "images" has the GPU's structure (the model
# trained on augmented images), at 32 px from block 5 and on the cosine schedule (each phase on
# its own curve).
FINE_TUNE_QUICK = ["--epochs", "2", "--fine-tune-epochs", "2"]
FINE_TUNE_RECIPES = {
    "cached": [],
    "images": ["--no-cache-frozen-blocks", "--feature-layer", "block5_pool", "--unfreeze-from", "block5_conv1",
               "--lr-schedule", "cosine", "--image-size", "32", "--no-test-time-flip"],
}
TRAINED_LAYERS = {"cached": ["block4_conv3"], "images": ["block5_conv1", "block5_conv2", "block5_conv3"]}


@pytest.fixture(scope="module")
def fine_tune_runs(shared_data, tmp_path_factory):
    """{recipe: run folder} for FINE_TUNE_RECIPES."""
    return {recipe: _run(fine_tune, tmp_path_factory.mktemp("fine-tune"), shared_data, *FINE_TUNE_QUICK, *flags)
            for recipe, flags in FINE_TUNE_RECIPES.items()}


def _trainable_base_layers(model):
    return sorted({weight.path.split("/")[0] for weight in model.trainable_weights if weight.path.startswith("block")})


def test_unfreezing_from_a_layer_that_is_no_convolution_is_rejected():
    for name in ("block5_pool", "block9_conv1", "dense"):
        with pytest.raises(InputError, match=f"--unfreeze-from: invalid choice: '{name}'"):
            cli.parse("", cli.constants(vars(fine_tune)), ["--unfreeze-from", name])


def test_split_base_computes_the_same_as_the_whole_base():
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    lower, upper = models.split_at(base, "block5_conv1")
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(upper.predict(lower.predict(images, verbose=0), verbose=0),
                               base.predict(images, verbose=0), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_subclassed_model_runs_end_to_end_and_reloads(subclassed_run, shared_data):
    run_dir = subclassed_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["api"] == "subclassing" and metrics["test_accuracy"] > 0.2  # chance is 0.1
    dataset = _test_images(transfer_learning_subclassed, shared_data)
    _assert_reloads_with_the_same_predictions(run_dir, dataset)  # model.keras: the same layers, functional
    subclassed = keras.saving.load_model(run_dir / "subclassed_model.keras")  # the class is defined: it reloads
    assert isinstance(subclassed, transfer_learning_subclassed.VGG16Classifier)
    assert subclassed.base.trainable_weights == [] and len(subclassed.head.trainable_weights) > 0
    np.testing.assert_allclose(subclassed.predict(dataset.x_test, verbose=0),
                               keras.saving.load_model(run_dir / "model.keras").predict(dataset.x_test, verbose=0),
                               atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["--no-train-base", "--train-base"])
def test_sequential_model_with_the_convolutional_head_under_both_policies(sequential_runs, shared_data, policy):
    run_dir = sequential_runs[policy]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["api"] == "sequential" and metrics["hyperparameters"]["IMAGE_SIZE"] == 64
    model = _assert_reloads_with_the_same_predictions(run_dir, _test_images(transfer_learning_sequential, shared_data))
    assert isinstance(model, keras.Sequential)
    block_4_and_below = [f"block{block}_conv{conv}" for block in (1, 2, 3, 4) for conv in (1, 2, 3) if block > 2 or conv < 3]
    assert _trainable_base_layers(model) == (sorted(block_4_and_below) if policy == "--train-base" else [])


@pytest.mark.slow
def test_sequential_head_without_spatial_room_is_rejected_before_training(shared_data, tmp_path, capsys):
    archive, weights = shared_data
    argv = ["--data", str(archive), "--weights", str(weights), "--out", str(tmp_path), *QUICK, "--image-size", "32"]
    script = transfer_learning_sequential
    assert cli.run(script.main, vars(script), argv) == 2
    assert "at least 4x4" in capsys.readouterr().err
    assert not list(tmp_path.glob("*/*"))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", FINE_TUNE_RECIPES)
def test_two_phase_fine_tuning_starts_phase_2_from_phase_1s_best_weights(fine_tune_runs, shared_data, recipe):
    run_dir = fine_tune_runs[recipe]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = _history(run_dir)
    phase_1 = history[: metrics["phase_1_epochs"]]
    assert len(history) == metrics["epochs_run"] > metrics["phase_1_epochs"]
    # Phase 2 begins where phase 1's best epoch left off (augmentation is off in evaluation).
    best_phase_1 = min(float(row["val_loss"]) for row in phase_1)
    assert metrics["checks"]["phase_2_start_val_loss"] == pytest.approx(best_phase_1, rel=1e-3)
    assert metrics["hyperparameters"]["CACHE_FROZEN_BLOCKS"] is (recipe == "cached")
    if recipe == "images":  # cosine: epoch 1 of each phase at its compiled rate, epoch 2 at half of it
        np.testing.assert_allclose([float(row["learning_rate"]) for row in history], [1e-3, 5e-4, 1e-4, 5e-5])
    else:  # test-time flip averaging, inside the saved model: the mirror images' predictions count
        model = keras.saving.load_model(run_dir / "model.keras")
        assert "mirror" in [layer.name for layer in model.layers]
    model = _assert_reloads_with_the_same_predictions(run_dir, _test_images(fine_tune, shared_data))
    assert _trainable_base_layers(model) == TRAINED_LAYERS[recipe]
    assert (run_dir / "checkpoints" / "best_phase_2.keras").is_file()
    # Phase 2 trained the unfrozen layers and left every layer below them as ImageNet had them.
    imagenet = _imagenet_weights(shared_data[1])
    saved = {weight.path: keras.ops.convert_to_numpy(weight) for weight in model.weights
             if weight.path.startswith("block")}
    assert len(saved) == (20 if recipe == "cached" else 26)  # cut after block 4, or after block 5
    for path, value in saved.items():
        layer, kind = path.split("/")
        if layer in TRAINED_LAYERS[recipe]:
            assert not np.allclose(value, imagenet[layer][kind]), path
        else:
            np.testing.assert_array_equal(value, imagenet[layer][kind], err_msg=path)


def _history(run_dir):
    with open(run_dir / "history.csv") as file:
        return list(csv.DictReader(file))


def _imagenet_weights(path):
    """{layer: {"kernel": ..., "bias": ...}} from a Keras VGG16 notop file (legacy HDF5 layout)."""
    import h5py

    with h5py.File(path) as file:
        return {name.decode(): {kind: file[name][f"{name.decode()}/{kind}:0"][()] for kind in ("kernel", "bias")}
                for name in file.attrs["layer_names"] if b"conv" in name}


@pytest.mark.slow
def test_a_completed_phase_is_not_trained_again_after_an_interruption(fine_tune_runs, shared_data, tmp_path,
                                                                       monkeypatch, capsys):
    uninterrupted = fine_tune_runs["cached"]
    archive, weights = shared_data
    argv = ["--data", str(archive), "--weights", str(weights), "--out", str(tmp_path), *QUICK, *FINE_TUNE_QUICK,
            *FINE_TUNE_RECIPES["cached"]]
    with monkeypatch.context() as patch:
        interrupt_after_epochs(patch, 3)  # Ctrl-C after phase 2's first epoch
        assert cli.run(fine_tune.main, vars(fine_tune), argv) == 130
    capsys.readouterr()
    fits = []
    original_fit = keras.Model.fit
    monkeypatch.setattr(keras.Model, "fit", lambda self, *a, **k: fits.append(self.name) or original_fit(self, *a, **k))
    assert cli.run(fine_tune.main, vars(fine_tune), argv) == 0
    output = capsys.readouterr().out
    assert "phase_1: completed before the interruption" in output and "Resuming after epoch 1" in output
    assert fits == ["head", "vgg16_upper_and_head"]  # phase 1's fit returned at once (below)
    (run_dir,) = [p for p in (tmp_path / "fine_tune").iterdir() if not p.name.startswith(".")]
    resumed, reference = _history(run_dir), _history(uninterrupted)
    assert len(reference) == 4 and resumed == reference  # both phases, before and after the interruption
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["phase_1_epochs"] == 2 and metrics["epochs_run"] == 4
    assert metrics["test_accuracy"] == json.loads((uninterrupted / "metrics.json").read_text())["test_accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("network, convolutions", [("small_cnn", 6), ("vgg16_bn", 13)])  # VGG11-BN: as VGG16-BN
def test_baselines_train_from_scratch_and_reload(shared_data, network, convolutions, tmp_path):
    run_dir = _run(baselines, tmp_path, shared_data, "--model", network, "--epochs", "1")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["weights"].startswith("none") and metrics["hyperparameters"]["MODEL"] == network
    model = _assert_reloads_with_the_same_predictions(run_dir, _test_images(baselines, shared_data))
    layers = list(activations.all_layers(model))
    assert sum(isinstance(layer, keras.layers.Conv2D) for layer in layers) == convolutions
    assert not any(isinstance(layer, models.RandomFlipAndShift) for layer in layers)  # saved without augmentation
    assert all(weight.trainable for weight in model.trainable_weights) and len(model.trainable_weights) > 0
    # Everything learns but the batch-normalisation statistics, which are averaged, not trained.
    normalisations = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(normalisations) == convolutions + (network == "small_cnn")  # the small CNN's dense layer too
    statistics = {weight.path for layer in normalisations for weight in (layer.moving_mean, layer.moving_variance)}
    assert {weight.path for weight in model.non_trainable_weights} == statistics


def test_baselines_decay_the_kernels_only():
    classifier = baselines.build_network((32, 32, 3), 10)  # the small CNN
    optimizer = baselines.decoupled_weight_decay(classifier, 0.1, baselines.WEIGHT_DECAY)
    variables = classifier.trainable_variables
    before = [keras.ops.convert_to_numpy(v) for v in variables]
    # With zero gradients Adam's own step is zero, so only the weight decay moves anything.
    optimizer.apply_gradients([(keras.ops.zeros_like(v), v) for v in variables])
    shrink = 1 - 0.1 * baselines.WEIGHT_DECAY
    for variable, old in zip(variables, before):
        expected = old * shrink if len(variable.shape) >= 2 else old  # kernels; not biases, gamma, beta
        np.testing.assert_allclose(keras.ops.convert_to_numpy(variable), expected, rtol=1e-6, err_msg=variable.path)
    assert sum(len(v.shape) >= 2 for v in variables) == 8  # 6 convolutions, the dense layer and the output layer


def test_unknown_baseline_is_rejected(tmp_path, capsys):
    argv = ["--model", "resnet50", "--out", str(tmp_path)]
    assert cli.run(baselines.main, vars(baselines), argv, pretrained=False) == 2
    assert "--model: invalid choice: 'resnet50' (choose from 'small_cnn', 'vgg11_bn', 'vgg16_bn')" in capsys.readouterr().err


@pytest.fixture(scope="module")
def runs_of_every_api(subclassed_run, sequential_runs, fine_tune_runs, tmp_path_factory):
    """A fresh out/ with this module's quick runs of each API: the subclassed job, the
    Sequential job (frozen base) and the functional fine-tuning on both schedules."""
    import shutil

    out_dir = tmp_path_factory.mktemp("every-api")
    sources = [subclassed_run, sequential_runs["--no-train-base"], *fine_tune_runs.values()]
    for index, run_dir in enumerate(sources):
        shutil.copytree(run_dir, out_dir / run_dir.parent.name / f"{run_dir.name}-{index}")
    return out_dir


@pytest.mark.slow
def test_compare_gathers_every_complete_run(runs_of_every_api, capsys):
    out_dir = runs_of_every_api
    (out_dir / "fine_tune" / ".20990101-000000.partial").mkdir(parents=True, exist_ok=True)  # left out
    assert compare.main(["--out", str(out_dir)]) == 0
    table = capsys.readouterr().out
    with open(out_dir / "comparison.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 4
    accuracies = [float(row["test_accuracy"]) for row in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    for row in rows:  # each row is its own run's figures
        metrics = json.loads((out_dir / row["script"] / row["run"] / "metrics.json").read_text())
        assert float(row["test_accuracy"]) == metrics["test_accuracy"]
        assert int(row["trainable_parameters"]) == metrics["model"]["trainable_parameters"]
    assert {row["api"] for row in rows} == {"subclassing", "functional", "sequential"}
    assert {row["lr_schedule"] for row in rows} == {"plateau", "cosine"}
    assert "| script | run | API |" in table and (out_dir / "comparison.md").read_text() in table


@pytest.mark.slow
def test_gradcam_explains_the_saved_model_of_every_api(runs_of_every_api, shared_data):
    out_dir = runs_of_every_api
    from vgg_transfer import gradcam

    images = _test_images(transfer_learning_subclassed, shared_data).x_test[:3]
    apis = set()
    for run_dir in sorted(p.parent for p in out_dir.glob("*/*/model.keras") if not p.parent.name.startswith(".")):
        model, _, _ = saved_models.load_saved_classifier(run_dir)
        maps, probabilities = gradcam.heatmaps(model, images)
        # Correctness is checked against a reference in test_gradcam.py; here, every API's model:
        assert maps.shape == images.shape[:3] and np.isfinite(maps).all() and maps.min() >= 0
        assert set(np.round(maps.max(axis=(1, 2)), 6)) <= {0.0, 1.0}  # scaled to 1, or no evidence at all
        np.testing.assert_allclose(probabilities, model.predict(images, verbose=0), atol=1e-5)
        apis.add(json.loads((run_dir / "metrics.json").read_text())["api"])
    assert apis == {"subclassing", "functional", "sequential"}


@pytest.mark.slow
def test_every_model_a_run_saves_works_in_every_tool(runs_of_every_api, subclassed_run, shared_data, tmp_path,
                                                      capsys):
    """model.keras of every API's run, and the subclassed run's subclassed_model.keras, in
    predict.py, gradcam.py, feature_maps.py and export.py; predict.py also as a user runs it."""
    import subprocess
    import sys

    import export
    import feature_maps
    import gradcam as gradcam_script
    import predict
    from PIL import Image

    image = tmp_path / "a test image.png"
    Image.fromarray(_test_images(transfer_learning_subclassed, shared_data).x_test[0]).save(image)
    model_files = [*sorted(runs_of_every_api.glob("*/*/model.keras")), subclassed_run / "subclassed_model.keras"]
    assert len(model_files) == 5
    for number, model_file in enumerate(model_files):
        out = tmp_path / f"out-{number}"
        capsys.readouterr()
        assert predict.main(predict.parse_arguments([str(image), "--model", str(model_file), "--json"])) == 0
        (prediction,) = json.loads(capsys.readouterr().out)["predictions"]
        assert len(prediction["top"]) == 3 and 0 < sum(item["probability"] for item in prediction["top"]) <= 1 + 1e-6
        gradcam_script.main(gradcam_script.parse_arguments([str(image), "--model", str(model_file), "--out", str(out)]))
        feature_maps.main(feature_maps.parse_arguments([str(image), "--model", str(model_file), "--out", str(out)]))
        export.main(export.parse_arguments([str(model_file), "--format", "tf_saved_model", "--out",
                                            str(out / "exported")]))
        assert len(list(out.glob("gradcam/*/gradcam.png"))) == 1 and list(out.glob("feature_maps/*/*.png"))
        assert (out / "exported" / "saved_model").is_dir(), model_file
    finished = subprocess.run([sys.executable, str(PROJECT_ROOT / "src" / "predict.py"), str(image), "--model",
                               str(model_files[-1])], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0 and finished.stdout.startswith(f"{image}: "), finished.stderr[-2000:]


@pytest.mark.slow
def test_gradcam_script_writes_a_picture_of_a_run(subclassed_run, shared_data, tmp_path):
    import gradcam as gradcam_script
    from PIL import Image

    run_dir = subclassed_run
    arguments = gradcam_script.parse_arguments(
        ["--model", str(run_dir), "--data", str(shared_data[0]), "--images-per-class", "1", "--out", str(tmp_path)]
    )
    gradcam_script.main(arguments)
    (picture,) = tmp_path.glob("gradcam/*/gradcam.png")
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.width >= 600 and image.height >= 1000  # 10 classes, 5 rows
    with np.load(picture.parent / "heatmaps.npz") as stored:
        assert stored["heatmaps"].shape == (10, 32, 32)
    with pytest.raises(InputError, match="not a convolution layer"):
        gradcam_script.main(gradcam_script.parse_arguments(["--model", str(run_dir), "--layer", "dense"]))


def test_compare_without_runs_says_what_to_do(tmp_path, capsys):
    assert compare.main(["--out", str(tmp_path)]) == 2
    assert "no completed runs" in capsys.readouterr().err


def test_explore_data_draws_counts_samples_and_original_sizes(tmp_path):
    import explore_data
    from PIL import Image
    from test_data import write_image_tree

    root = write_image_tree(tmp_path / "tree", per_class=4)  # images of more than one size
    explore_data.main(explore_data.parse_arguments(["--data", str(root), "--out", str(tmp_path / "out"),
                                                    "--samples-per-class", "3"]))
    (folder,) = (tmp_path / "out" / "explore_data").iterdir()
    for name in ("class_distribution.png", "samples.png", "augmentation.png", "image_sizes.png"):
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and image.width >= 500 and image.height >= 300
    sizes = data.original_image_sizes(root)
    assert len(sizes) == 24 and len(set(sizes)) >= 2  # as stored, not as converted to 32x32


@pytest.mark.parametrize("hardware, expected", [
    ("gpu", (128, "block1_conv1", False)), ("cpu_amx", (64, "block4_conv3", True)), ("cpu", (32, "block4_conv3", True)),
])
def test_each_script_picks_its_recipe_by_the_kind_of_machine(monkeypatch, hardware, expected):
    """The recipe with the kind of machine forced: the constants that depend on HARDWARE take
    that kind's value, and flags still override them."""
    import importlib

    from vgg_transfer import devices

    monkeypatch.setenv(devices.HARDWARE_VARIABLE, hardware)
    try:
        script = importlib.reload(fine_tune)
        assert script.HARDWARE == hardware and script.PRECISION == "auto"
        assert (script.IMAGE_SIZE, script.UNFREEZE_FROM, script.CACHE_FROZEN_BLOCKS) == expected
        values, _ = cli.parse("", cli.constants(vars(script)), ["--image-size", "48"])
        assert values["IMAGE_SIZE"] == 48 and values["HARDWARE"] == hardware  # flags still override
    finally:
        monkeypatch.undo()
        importlib.reload(fine_tune)  # this machine's recipe again, for the other tests


@pytest.mark.slow
def test_the_wall_time_estimate_is_printed_and_close_to_the_training_time(shared_data, tmp_path, capsys):
    import re

    import transfer_learning

    archive, weights = shared_data
    argv = ["--data", str(archive), "--weights", str(weights), "--out", str(tmp_path), "--subset", "2000",
            "--batch-size", "16", "--epochs", "4", "--early-stopping-patience", "10", "--quiet"]
    assert cli.run(transfer_learning.main, vars(transfer_learning), argv) == 0
    output = capsys.readouterr().out
    # PRECISION = "auto": this CPU's choice, with its reason, printed and recorded.
    (precision_line,) = [line for line in output.splitlines() if line.startswith("Precision: ")]
    assert re.fullmatch(r"Precision: (float32|bfloat16) \(the CPU has .*\)", precision_line), precision_line
    (line,) = [line for line in output.splitlines() if line.startswith("Training: about")]
    number, unit = re.match(r"Training: about (\d+) (s|min) for 4 epochs on this CPU", line).groups()
    estimate = int(number) * (60 if unit == "min" else 1)
    (run_dir,) = (tmp_path / "transfer_learning").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert precision_line == f"Precision: {metrics['precision']['name']} ({metrics['precision']['reason']})"
    measured = metrics["seconds"]["training"]
    assert measured / 2 <= estimate <= measured * 2, (line, measured)
