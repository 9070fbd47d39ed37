"""VGG16's preprocessing, weights and augmentation, the feature cache, and loading saved models."""

import h5py
import keras
import numpy as np
import pytest
from PIL import Image

from vgg_transfer import data, models
from vgg_transfer.errors import InputError


def test_preprocessing_equals_vgg16_preprocess_input_with_built_in_layers():
    images = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    expected = keras.applications.vgg16.preprocess_input(images.astype("float32"))
    preprocessing = models.vgg16_preprocessing((32, 32, 3), 32)
    np.testing.assert_array_equal(preprocessing.predict(images, verbose=0), expected)  # exactly
    assert all(type(layer).__module__.startswith("keras.") for layer in preprocessing.layers)
    assert preprocessing.inputs[0].dtype == "uint8" and preprocessing.trainable_weights == []
    # Earlier versions' layer, kept for their saved models, computes the same.
    from vgg_transfer import legacy

    np.testing.assert_allclose(keras.ops.convert_to_numpy(legacy.VGG16Preprocess()(images)), expected, atol=1e-4)


def test_preprocessing_resizes_inside_the_model_and_augments_only_in_training():
    images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    plain = models.vgg16_preprocessing((32, 32, 3), 64)
    augmented = models.vgg16_preprocessing((32, 32, 3), 64, augment=True)
    assert [layer.name for layer in plain.layers] == ["minus_imagenet_means", "rgb_to_bgr", "resize"]
    assert [layer.name for layer in augmented.layers] == ["minus_imagenet_means", "rgb_to_bgr", "augmentation",
                                                          "resize"]
    resized = plain.predict(images, verbose=0)
    assert resized.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(augmented(images, training=False), resized, atol=1e-4)
    assert not np.allclose(augmented(images, training=True), resized, atol=1e-2)


def test_photos_shrunk_to_a_small_image_size_are_said_to_be_in_one_line(capsys, monkeypatch):
    """Photos stored at 256 px and IMAGE_SIZE left at 32: the run says the network sees
    thumbnails and names the --image-size that shows more (at most 4x the side), once."""
    monkeypatch.setattr(models, "_noted", set())  # said once per process: forget earlier tests'
    models.vgg16_preprocessing((256, 192, 3), 32)
    models.vgg16_preprocessing((256, 192, 3), 32)
    models.vgg16_preprocessing((32, 32, 3), 32)  # CIFAR-10 at its own size: nothing to say
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "stored at 256 px" in lines[0] and "at 32 px" in lines[0]
    assert "--image-size 128" in lines[0] and "16 times the compute" in lines[0]


def test_imagenet_weights_from_in_folder_are_found(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("VGG_TRANSFER_IN_DIR", str(tmp_path))
    (tmp_path / models.WEIGHTS_FILE_NAME).symlink_to(shared_data[1])
    assert models.resolve_weights("imagenet") == (str(tmp_path / models.WEIGHTS_FILE_NAME),
                                                  f"ImageNet ({tmp_path / models.WEIGHTS_FILE_NAME})")
    assert models.resolve_weights("none") == (None, "none (random initialisation)")


def test_weights_file_missing_corrupt_or_of_another_architecture(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        models.resolve_weights(str(tmp_path / "absent.h5"))

    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(InputError, match="not a Keras VGG16 notop weights file"):
        models.resolve_weights(str(corrupt))

    other = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="dense")])
    other_file = tmp_path / "other.weights.h5"
    other.save_weights(other_file)
    legacy = tmp_path / "other_model.h5"
    with h5py.File(legacy, "w") as file:  # legacy layout, but the layers of another model
        file.attrs["layer_names"] = [b"dense"]
        group = file.create_group("dense")
        group.attrs["weight_names"] = [b"dense/kernel:0"]
        group.create_dataset("dense/kernel:0", data=np.zeros((8, 4), np.float32))
    for path in (other_file, legacy):
        with pytest.raises(InputError, match="not a Keras VGG16 notop weights file"):
            models.resolve_weights(str(path))


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.fromarray(np.full((4, 4), 100 * 257, np.uint16)), 100),  # 16-bit grey, scaled
        (Image.fromarray(np.full((4, 4, 4), (10, 20, 30, 0), np.uint8)), 255),  # transparent: white
        (Image.fromarray(np.full((4, 4), 77, np.uint8)), 77),  # 8-bit grey
    ],
    ids=["16-bit", "rgba", "grey"],
)
def test_any_mode_becomes_8_bit_rgb(image, expected):
    rgb = np.asarray(data.to_rgb(image))
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8
    assert np.all(rgb == expected)


def test_failed_imagenet_download_says_which_file_to_put_where(tmp_path, monkeypatch):
    def offline(**kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: no network")

    monkeypatch.setenv("VGG_TRANSFER_IN_DIR", str(tmp_path))
    monkeypatch.setattr(keras.applications, "VGG16", offline)
    with pytest.raises(InputError, match=f"could not download the ImageNet weights .*{models.WEIGHTS_FILE_NAME} into"):
        models.resolve_weights("imagenet")


def test_predictions_and_splits_on_several_devices_cover_every_test_image(monkeypatch):
    """With 3 devices, the test set is padded for prediction and the padding dropped, and
    the training and validation sets are cut to whole multiples of 3."""
    from vgg_transfer import distribute

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    x = np.random.default_rng(0).standard_normal((7, 4)).astype("float32")
    expected = model.predict(x, verbose=0)
    monkeypatch.setattr(distribute, "replicas", 3)
    seen = []
    monkeypatch.setattr(model, "predict", lambda inputs, **kwargs: seen.append(len(inputs)) or expected[
        np.minimum(np.arange(len(inputs)), len(x) - 1)])
    np.testing.assert_array_equal(distribute.predict(model, x, batch_size=3), expected)
    assert seen == [9]  # padded to a multiple of 3

    images = np.zeros((11, 32, 32, 3), np.uint8)
    dataset = data.Dataset(images, np.arange(11), images[:5], np.arange(5), images[:4], np.arange(4),
                           ("a",), "test", "test")
    trimmed = distribute.whole_batches(dataset)
    assert (len(trimmed.x_train), len(trimmed.y_train), len(trimmed.x_val), len(trimmed.y_val)) == (9, 9, 3, 3)
    assert len(trimmed.x_test) == 4  # the test set stays whole


def test_a_model_saved_on_the_torch_backend_loads_on_this_one(tmp_path):
    """On torch, Keras saves optimizers under torch-only class paths (also inside nested,
    separately compiled parts such as the main job's head); the project's loader maps them."""
    import json
    import zipfile

    head = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(),
                             keras.layers.Dense(2, activation="softmax")], name="head")
    head.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    inputs = keras.Input((4, 4, 3), dtype="uint8")
    model = keras.Model(inputs, head(keras.ops.cast(inputs, "float32")))
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="sparse_categorical_crossentropy")
    saved, as_if_torch = tmp_path / "saved.keras", tmp_path / "model.keras"
    model.save(saved)
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(as_if_torch, "w") as target:
        for item in source.infolist():
            content = source.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(content)
                assert _as_saved_on_torch(config) == 2  # the head's Adam and the model's AdamW
                content = json.dumps(config).encode()
            target.writestr(item, content)
    import importlib.util

    if importlib.util.find_spec("torch") is None:  # plain Keras then cannot import those classes
        with pytest.raises(Exception, match="torch"):
            keras.saving.load_model(as_if_torch)
    loaded, _, side = models.load_saved_classifier(as_if_torch)
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    assert side == 4
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)


def _as_saved_on_torch(config):
    """Rewrites every optimizer entry of a saved model's config as Keras on torch writes it;
    returns how many there were."""
    if isinstance(config, list):
        return sum(_as_saved_on_torch(item) for item in config)
    if not isinstance(config, dict):
        return 0
    if config.get("module") == "keras.optimizers":
        config["module"] = f"keras.src.backend.torch.optimizers.torch_{config['class_name'].lower()}"
        config["registered_name"] = config["class_name"]
        return 1
    return sum(_as_saved_on_torch(value) for value in config.values())


def test_flip_and_shift_moves_each_image_within_its_bound_with_reflected_edges():
    layer = models.RandomFlipAndShift(max_shift=4, seed=0)
    height, width = 12, 10
    images = np.stack([np.arange(height * width * 3, dtype="float32").reshape(height, width, 3) + 1000 * i
                       for i in range(32)])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(images, training=False)), images)  # inference
    shifted = keras.ops.convert_to_numpy(layer(images, training=True))
    seen = set()
    for image, output in zip(images, shifted):
        padded = np.pad(image, [(4, 4), (4, 4), (0, 0)], mode="reflect")
        matches = [(row, column, flip)
                   for row in range(9) for column in range(9) for flip in (False, True)
                   if np.array_equal(output, (lambda w: w[:, ::-1] if flip else w)(
                       padded[row:row + height, column:column + width]))]
        assert matches, "not a flipped or shifted copy of its input within 4 pixels"
        seen.add(matches[0])
    assert len(seen) > 10 and {flip for _, _, flip in seen} == {False, True}  # the draws vary


def test_feature_cache_is_rebuilt_when_the_cut_the_image_size_or_the_precision_changes(tmp_path):
    from vgg_transfer import features

    images = {"train": np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)}

    def extract(output_layer="block4_pool", image_size=32):
        keras.utils.set_random_seed(0)  # the same random weights every time
        vgg16 = keras.applications.VGG16(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
        base = keras.Model(vgg16.input, vgg16.get_layer(output_layer).output)
        extractor = keras.Sequential([models.vgg16_preprocessing((32, 32, 3), image_size), base])
        return features.cached_features(extractor, images, batch_size=4, verbose=0, cache_dir=tmp_path)

    first, from_cache = extract()
    assert not from_cache and extract()[1]  # the same extractor again: read from the cache
    for changed in ({"output_layer": "block3_pool"}, {"image_size": 64}):
        again, from_cache = extract(**changed)
        assert not from_cache, changed
        assert again["train"].shape != first["train"].shape or not np.array_equal(again["train"], first["train"])
    try:
        keras.config.set_dtype_policy("mixed_bfloat16")
        _, from_cache = extract()
        assert not from_cache  # bfloat16 features are not the float32 ones
    finally:
        keras.config.set_dtype_policy("float32")
    assert len(list(tmp_path.glob("features-*.npy"))) == 4


def test_a_head_that_disagrees_with_the_whole_model_falls_back_to_whole_model_predictions():
    from vgg_transfer import features

    rng = np.random.default_rng(0)
    x_test = rng.integers(0, 256, (300, 4, 4, 3), dtype=np.uint8)
    head = keras.Sequential([keras.Input((48,)), keras.layers.Dense(3, activation="softmax")])
    inputs = keras.Input((4, 4, 3), dtype="uint8")
    flat = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    classifier = keras.Model(inputs, head(flat))
    right = (x_test.reshape(300, -1) / 255).astype("float32")
    expected = classifier.predict(x_test, verbose=0)
    agreeing = features.predict_with_cached_features(classifier, head, right, x_test, batch_size=64)
    np.testing.assert_allclose(agreeing, expected, atol=1e-5)
    wrong = right[::-1].copy()  # features of other images: the head's predictions are not the model's
    with pytest.warns(UserWarning, match="differs from the whole model"):
        fallback = features.predict_with_cached_features(classifier, head, wrong, x_test, batch_size=64)
    np.testing.assert_allclose(fallback, expected, atol=1e-6)


def test_benchmark_measures_a_tiny_size(tmp_path):
    import json

    import benchmark
    from vgg_transfer import cli

    argv = ["--image-sizes", "32", "--batch-size", "4", "--min-seconds", "0.2", "--matmul-size", "256",
            "--out", str(tmp_path)]
    assert cli.run(benchmark.main, vars(benchmark), argv) == 0
    (report,) = (tmp_path / "benchmark").glob("benchmark-*.json")
    result = json.loads(report.read_text())
    (row,) = result["results"]
    peak = result["matmul"]["tflops"] * 1e12
    # VGG16's 13 convolutions at 32 px: (side, input channels, output channels), 2 FLOPs a multiply-add.
    convolutions = [(32, 3, 64), (32, 64, 64), (16, 64, 128), (16, 128, 128), (8, 128, 256), *[(8, 256, 256)] * 2,
                    (4, 256, 512), *[(4, 512, 512)] * 2, *[(2, 512, 512)] * 3]
    forward = sum(2 * side * side * 9 * c_in * c_out for side, c_in, c_out in convolutions)
    assert row["image_size"] == 32 and row["forward_gflops_per_image"] * 1e9 == pytest.approx(forward, rel=1e-9)
    for kind, flops_per_image in (("inference", 1), ("training", 3)):
        figures = row[kind]
        assert figures["images_per_second"] > 0 and peak > 0
        achieved = figures["images_per_second"] * flops_per_image * row["forward_gflops_per_image"] * 1e9
        assert figures["tflops"] * 1e12 == pytest.approx(achieved, rel=1e-6)
        assert figures["fraction_of_peak"] == pytest.approx(achieved / peak, rel=1e-6)
        assert 0 < figures["fraction_of_peak"] < 2  # no device runs VGG16 far above its matrix-product peak


@pytest.mark.parametrize("name", ["functional", "subclassed"])
def test_models_saved_by_earlier_versions_still_load_through_the_project(name):
    from conftest import PROJECT_ROOT

    folder = PROJECT_ROOT / "tests" / "data"
    model, class_names, side = models.load_saved_classifier(folder / f"legacy_{name}.keras")
    with np.load(folder / "legacy_predictions.npz") as saved:
        assert side == {"functional": 24, "subclassed": 32}[name] and len(class_names) == 3  # subclassed: its IMAGE_SIZE
        np.testing.assert_allclose(model.predict(saved["images"], verbose=0), saved[name], atol=1e-6)
