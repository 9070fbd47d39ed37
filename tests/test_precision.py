"""The precisions the defaults take, run by the scripts themselves: what `PRECISION = "auto"`
picks on this machine, bfloat16 (CPUs with bfloat16 units, recent GPUs) and float16 with loss
scaling (T4, V100), each trained, saved, resumed after an interruption and exported."""

import csv
import re

import keras
import numpy as np
import pytest

import export
import fine_tune
import transfer_learning
from conftest import interrupt_after_epochs
from main_job import NOISE, history_of, metrics_of, served_predictions
from vgg_transfer import cli, data, devices, saved_models, training

pytestmark = pytest.mark.slow
# A small main job in 64-image batches, so that float16's loss scale is updated over 36 steps.
COMMAND = ["--subset", "600", "--epochs", "4", "--early-stopping-patience", "10", "--batch-size", "64", "--quiet"]
FINE_TUNE_COMMAND = ["--subset", "300", "--epochs", "2", "--fine-tune-epochs", "2", "--quiet"]


class _FinalOptimizerState(keras.callbacks.Callback):
    """Records every optimizer variable when a `fit` ends (Adam's moments and step; under
    float16 the loss scale and its counter too), by phase."""

    def __init__(self, record, phase):
        super().__init__()
        self.record, self.phase = record, phase

    def on_train_end(self, logs=None):
        self.record[self.phase] = {variable.path: keras.ops.convert_to_numpy(variable)
                                   for variable in self.model.optimizer.variables}


def _assert_same_state(state, reference):
    """The same optimizer variables with the same values, in order (the objects' numbered names
    differ between runs in one process: adam_1/dense_1_kernel_momentum, adam_7/dense_9_...)."""
    assert len(state) == len(reference)
    for (path, value), (reference_path, reference_value) in zip(state.items(), reference.items()):
        assert re.sub(r"_?\d+", "", path.split("/")[-1]) == re.sub(r"_?\d+", "", reference_path.split("/")[-1])
        np.testing.assert_array_equal(value, reference_value, err_msg=reference_path)


def _run(script, shared_data, out_dir, monkeypatch, *extra, interrupt_after=None):
    """Runs `script` in this process; returns (exit status, run folder or None, final optimizer
    states by phase). `interrupt_after` epochs: Ctrl-C then (status 130)."""
    archive, weights = shared_data
    record = {}
    original = training.project_callbacks
    with monkeypatch.context() as patch:
        patch.setattr(training, "project_callbacks", lambda run, callbacks, batches, phase="training": [
            *original(run, callbacks, batches, phase), _FinalOptimizerState(record, phase)])
        if interrupt_after:
            interrupt_after_epochs(patch, interrupt_after)
        status = cli.run(script.main, vars(script), ["--data", str(archive), "--weights", str(weights),
                                                     "--out", str(out_dir), *extra])
    complete = [path for path in (out_dir / script.__name__).iterdir() if not path.name.startswith(".")]
    return status, (complete[0] if complete else None), record


@pytest.fixture(scope="module")
def precision_runs(shared_data, tmp_path_factory):
    """{precision: (run folder, final optimizer states)} of the main job's COMMAND in bfloat16
    and float16, and of a one-epoch run as "auto" picks."""
    found = {}
    with pytest.MonkeyPatch.context() as patch:
        for precision in ("bfloat16", "float16", "auto"):
            command = COMMAND if precision != "auto" else ["--subset", "200", "--epochs", "1", "--quiet"]  # the choice alone
            status, run_dir, record = _run(transfer_learning, shared_data, tmp_path_factory.mktemp(precision), patch,
                                           *command, "--precision", precision)
            assert status == 0
            found[precision] = run_dir, record
    return found


@pytest.mark.parametrize("precision, policy", [("bfloat16", "mixed_bfloat16"), ("float16", "mixed_float16")])
def test_mixed_precision_computes_in_half_precision_with_float32_weights_outputs_and_figures(
        precision_runs, precision, policy):
    run_dir, record = precision_runs[precision]
    metrics = metrics_of(run_dir)
    assert metrics["precision"]["name"] == precision and metrics["precision"]["dtype_policy"] == policy
    assert metrics["hyperparameters"]["PRECISION"] == precision and metrics["epochs_run"] == 4
    other = metrics_of(precision_runs["float16" if precision == "bfloat16" else "bfloat16"][0])
    assert metrics["test_accuracy"] > 0.3 and metrics["test_accuracy"] == pytest.approx(other["test_accuracy"], abs=NOISE)
    model = keras.saving.load_model(run_dir / "model.keras")
    head_layers = model.get_layer("head").layers
    assert {layer.dtype_policy.compute_dtype for layer in head_layers} == {precision, "float32"}
    assert model.output.dtype == "float32" and {weight.dtype for weight in model.weights} == {"float32"}
    loss_scaled = any("dynamic_scale" in path for path in record["training"])
    assert loss_scaled == (precision == "float16")  # Keras scales the loss of float16 training only
    keras.config.set_dtype_policy("float32")  # loading a mixed-precision model leaves the policy alone; be sure


def test_auto_takes_the_precision_the_device_computes_fastest_and_the_saved_model_computes_in_it(precision_runs):
    run_dir, _ = precision_runs["auto"]
    chosen, reason = devices.choose_precision("auto")
    metrics = metrics_of(run_dir)
    assert (metrics["precision"]["name"], metrics["precision"]["reason"]) == (chosen, reason)
    dense = keras.saving.load_model(run_dir / "model.keras").get_layer("head").layers[3]
    assert isinstance(dense, keras.layers.Dense) and dense.dtype_policy.compute_dtype == chosen
    keras.config.set_dtype_policy("float32")


@pytest.mark.parametrize("format_name", ["litert", "tf_saved_model", "onnx"])
def test_exports_of_half_precision_models_run_and_agree_with_predict(precision_runs, shared_data, format_name, tmp_path):
    """Each export of a bfloat16 and a float16 model runs in its stock runtime (LiteRT's
    interpreter has no half-precision kernels: the export computes in float32) and gives what
    predict.py's model gives: every probability within 2e-2, so the same top class wherever
    the two best are more than 4e-2 apart."""
    for precision in ("bfloat16", "float16"):
        run_dir, _ = precision_runs[precision]
        assert cli.run_tool(export.main, export.parse_arguments,
                            [str(run_dir), "--format", format_name, "--out", str(tmp_path / precision)]) == 0
        model, _, side = saved_models.load_saved_classifier(run_dir)
        images = data.load_dataset(shared_data[0], seed=42, subset=600, verbose=False).x_test[:32]  # the run's
        with open(run_dir / "predictions.csv") as file:
            confidences = [float(row["confidence"]) for row in csv.DictReader(file)]
        assert min(confidences) < 0.9  # not a model so sure of everything that any export agrees
        expected = keras.ops.convert_to_numpy(model.predict(images, verbose=0)).astype(np.float32)
        served = served_predictions(format_name, tmp_path / precision, images)
        np.testing.assert_allclose(served, expected, atol=2e-2)
        top_two = np.sort(expected, axis=1)[:, -2:]
        clear = top_two[:, 1] - top_two[:, 0] > 4e-2
        assert clear.sum() >= 16 and np.array_equal(served.argmax(1)[clear], expected.argmax(1)[clear])
        keras.config.set_dtype_policy("float32")


def test_float16_training_resumes_exactly_with_its_loss_scale(precision_runs, shared_data, tmp_path, monkeypatch):
    """The main job in float16, stopped by Ctrl-C after its second epoch and run again: the same
    history, test figures and final optimizer state (Adam's moments, the loss scale and the
    counter of steps since it last changed) as the uninterrupted run."""
    reference, reference_state = precision_runs["float16"]
    command = [*COMMAND, "--precision", "float16"]
    status, run_dir, _ = _run(transfer_learning, shared_data, tmp_path, monkeypatch, *command, interrupt_after=2)
    assert status == 130 and run_dir is None
    status, run_dir, state = _run(transfer_learning, shared_data, tmp_path, monkeypatch, *command)
    assert status == 0
    assert history_of(run_dir) == history_of(reference)
    assert metrics_of(run_dir)["test_accuracy"] == metrics_of(reference)["test_accuracy"]
    scale, counter = (next(value for path, value in reference_state["training"].items() if name in path)
                      for name in ("dynamic_scale", "step_counter"))
    assert scale != 2.0**15 or counter > 0  # the loss scale's state moved: its restoration shows
    _assert_same_state(state["training"], reference_state["training"])
    keras.config.set_dtype_policy("float32")


def test_fine_tuning_in_float16_resumes_exactly_in_its_second_phase(shared_data, tmp_path, monkeypatch):
    """fine_tune.py's shipped recipe for this kind of machine in float16, uninterrupted, and
    stopped by Ctrl-C in phase 2 then run again: the same history and final optimizer state."""
    command = [*FINE_TUNE_COMMAND, "--precision", "float16"]
    status, reference, reference_state = _run(fine_tune, shared_data, tmp_path / "reference", monkeypatch, *command)
    assert status == 0 and any("dynamic_scale" in path for path in reference_state["phase_2"])
    status, _, _ = _run(fine_tune, shared_data, tmp_path / "stopped", monkeypatch, *command, interrupt_after=3)
    assert status == 130
    status, run_dir, state = _run(fine_tune, shared_data, tmp_path / "stopped", monkeypatch, *command)
    assert status == 0 and history_of(run_dir) == history_of(reference)
    _assert_same_state(state["phase_2"], reference_state["phase_2"])
    assert metrics_of(run_dir)["test_accuracy"] == metrics_of(reference)["test_accuracy"]
    keras.config.set_dtype_policy("float32")
