"""VGG16's preprocessing, weights and augmentation, the feature cache, and loading saved models."""

import h5py
import keras
import numpy as np
import pytest
from PIL import Image

from vgg_transfer import data, devices, image_files, models, pictures, saved_models, stored
from vgg_transfer.errors import InputError


def test_preprocessing_equals_vgg16_preprocess_input_with_built_in_layers():
    images = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    expected = keras.applications.vgg16.preprocess_input(images.astype("float32"))
    preprocessing = models.vgg16_preprocessing((32, 32, 3), 32)
    np.testing.assert_array_equal(preprocessing.predict(images, verbose=0), expected)  # exactly
    assert all(type(layer).__module__.startswith("keras.") for layer in preprocessing.layers)
    assert preprocessing.inputs[0].dtype == "uint8" and preprocessing.trainable_weights == []


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
    thumbnails and names the --image-size that shows more (at most 4x the side), once for a
    model and its augmented twin."""
    models.vgg16_preprocessing((256, 192, 3), 32)
    models.vgg16_preprocessing((256, 192, 3), 32, augment=True)
    models.vgg16_preprocessing((32, 32, 3), 32)  # CIFAR-10 at its own size: nothing to say
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "stored at 256 px" in lines[0] and "at 32 px" in lines[0]
    assert "--image-size 128" in lines[0] and "16 times the compute" in lines[0]


@pytest.mark.slow
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
    rgb = np.asarray(image_files.to_rgb(image))
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
    """With 3 devices, the test set is padded for prediction (the model really predicts the
    padding) and the padding's outputs dropped, and the training and validation sets are cut
    to whole multiples of 3."""
    from vgg_transfer import distribute

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    x = np.random.default_rng(0).standard_normal((7, 4)).astype("float32")
    expected = model.predict(x, verbose=0)
    monkeypatch.setattr(distribute, "replicas", lambda: 3)
    seen, original = [], model.predict
    monkeypatch.setattr(model, "predict", lambda inputs, **kwargs: seen.append(np.array(inputs)) or original(
        inputs, **kwargs))
    np.testing.assert_allclose(distribute.predict(model, x, batch_size=3), expected, rtol=1e-6)
    (padded,) = seen
    assert len(padded) == 9 and np.array_equal(padded[:7], x) and np.array_equal(padded[7:], x[[-1, -1]])

    images = np.zeros((11, 32, 32, 3), np.uint8)
    dataset = data.Dataset(images, np.arange(11), images[:5], np.arange(5), images[:4], np.arange(4),
                           ("a",), "test", "test")
    trimmed = distribute.whole_batches(dataset)
    assert (len(trimmed.x_train), len(trimmed.y_train), len(trimmed.x_val), len(trimmed.y_val)) == (9, 9, 3, 3)
    assert len(trimmed.x_test) == 4  # the test set stays whole


def test_workers_that_disagree_are_named_and_a_cache_one_worker_lacks_is_not_read(monkeypatch, tmp_path):
    """With two worker processes (simulated: this process is worker 0, the other's values
    gathered by a stand-in for JAX's collective): a disagreement on the epoch to resume after
    is refused in one line, and features that only this worker has cached are extracted again,
    on every worker alike."""
    from vgg_transfer import distribute, features

    others = {}
    monkeypatch.setattr(distribute, "worker", lambda: (0, 2))
    monkeypatch.setattr(distribute, "_gathered", lambda value: [int(value), others["value"]])
    others["value"] = 3
    distribute.check_workers_agree(3, "the epoch to resume after")  # the same: fine
    others["value"] = 0
    with pytest.raises(InputError, match=r"the workers disagree on the epoch to resume after \(3, 0 for workers 0 "
                                         r"to 1\); delete the interrupted run's folders on every worker"):
        distribute.check_workers_agree(3, "the epoch to resume after")

    extractor = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    images = {"train": np.random.default_rng(0).standard_normal((6, 4)).astype("float32")}
    monkeypatch.setattr(distribute, "predict", lambda model, x, batch_size, verbose=0: model.predict(x, verbose=0))
    others["value"] = 1  # the other worker has the cache too
    features.cached_features(extractor, images, 2, 0, cache_dir=tmp_path)
    assert features.cached_features(extractor, images, 2, 0, cache_dir=tmp_path)[1]  # read from the cache
    others["value"] = 0  # the other worker lacks it: every worker extracts
    cached, from_cache = features.cached_features(extractor, images, 2, 0, cache_dir=tmp_path)
    assert not from_cache and np.allclose(cached["train"], extractor.predict(images["train"], verbose=0))


def test_a_model_saved_on_the_torch_backend_loads_here_and_predicts_what_it_did_there():
    """tests/data/torch_saved.keras was saved by Keras on the torch backend (see
    make_torch_saved_model.py beside it): its optimizers, the head's and the whole model's, carry
    torch-only class paths, which the project's loader maps; it predicts what it did on torch."""
    import importlib.util

    from conftest import PROJECT_ROOT

    folder = PROJECT_ROOT / "tests" / "data"
    assert "keras.src.backend.torch.optimizers" in _config_text(folder / "torch_saved.keras")
    if importlib.util.find_spec("torch") is None:  # plain Keras then cannot import those classes
        with pytest.raises(Exception, match="torch"):
            keras.saving.load_model(folder / "torch_saved.keras")
    loaded, class_names, side = saved_models.load_saved_classifier(folder / "torch_saved.keras")
    with np.load(folder / "torch_saved_predictions.npz") as saved:
        assert side == 8 and class_names == ["class 0", "class 1", "class 2"]
        np.testing.assert_allclose(loaded.predict(saved["images"], verbose=0), saved["probabilities"], atol=1e-5)


def _config_text(model_file):
    import zipfile

    with zipfile.ZipFile(model_file) as archive:
        return archive.read("config.json").decode()


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


def test_the_feature_cache_is_rebuilt_when_any_one_of_its_ingredients_changes(tmp_path):
    """Each ingredient of the cache key changed alone: other weights of the same shapes, one
    pixel of one image, the cut, the image size, the precision; and a truncated cache file is
    rebuilt, not trusted. Under bfloat16 the cache holds the features' 16 bits, read back exactly."""
    from vgg_transfer import features

    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)

    def extract(output_layer="block4_pool", image_size=32, seed=0, images=pixels):
        keras.utils.set_random_seed(seed)  # the same random weights for the same seed
        vgg16 = keras.applications.VGG16(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
        base = keras.Model(vgg16.input, vgg16.get_layer(output_layer).output)
        extractor = keras.Sequential([models.vgg16_preprocessing((32, 32, 3), image_size), base])
        cached, from_cache = features.cached_features(extractor, {"train": images}, batch_size=4, verbose=0,
                                                      cache_dir=tmp_path)
        return cached["train"], from_cache, extractor

    first, from_cache, extractor = extract()
    assert not from_cache
    again, from_cache, _ = extract()
    assert from_cache and np.array_equal(again, first)  # the same extractor and images: read from the cache
    changed_pixel = pixels.copy()
    changed_pixel[2, 5, 7, 1] ^= 1
    for name, changed in (("weights", {"seed": 1}), ("one pixel", {"images": changed_pixel}),
                          ("cut", {"output_layer": "block3_pool"}), ("image size", {"image_size": 64})):
        features_now, from_cache, _ = extract(**changed)
        assert not from_cache, name
        assert features_now.shape != first.shape or not np.array_equal(features_now, first), name
    (cache_file,) = [path for path in tmp_path.glob("features-*.npy") if path.stat().st_mtime_ns ==
                     min(p.stat().st_mtime_ns for p in tmp_path.glob("features-*.npy"))]
    cache_file.write_bytes(cache_file.read_bytes()[:-100])  # truncated, e.g. by a full disk
    with pytest.warns(UserWarning, match="Ignoring unreadable feature cache"):
        rebuilt, from_cache, _ = extract()
    assert not from_cache and np.array_equal(rebuilt, first)
    try:
        keras.config.set_dtype_policy("mixed_bfloat16")
        half, from_cache, extractor = extract()
        assert not from_cache and isinstance(half, stored.Bfloat16Array)  # 16 bits in memory too
        half = half[:]  # read as float32
        assert not from_cache  # bfloat16 features are not the float32 ones
        (stored_file,) = tmp_path.glob("features-*" + stored.BFLOAT16_SUFFIX)
        assert stored_file.stat().st_size < first.nbytes / 2 + 1024  # 16 bits a value
        computed = np.asarray(extractor.predict(pixels, verbose=0), np.float32)
        np.testing.assert_array_equal(half, computed)  # exactly what was computed, back as float32
        assert half.dtype == np.float32 and 0 < np.max(np.abs(half - first)) < 0.05 * np.max(np.abs(first))
    finally:
        keras.config.set_dtype_policy("float32")
    assert len(list(tmp_path.glob("features-*.npy"))) == 6


def test_a_cache_extracted_in_one_precision_is_never_read_in_another(tmp_path):
    """The same weights and images in float16, then float32, then bfloat16: each precision
    extracts its own features (float16 ones are cached as plain .npy files too, so only the key
    tells them apart), and a float32 run reads float32 values, not float16 ones."""
    from vgg_transfer import features

    images = np.random.default_rng(0).standard_normal((8, 16)).astype("float32")

    def extract(precision):
        devices.set_precision(precision)
        keras.utils.set_random_seed(0)  # the same weights in every precision
        extractor = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32)])
        cached, from_cache = features.cached_features(extractor, {"train": images}, 8, 0, cache_dir=tmp_path)
        return cached["train"][:], from_cache, extractor

    try:
        half, from_cache, _ = extract("float16")
        assert not from_cache
        full, from_cache, extractor = extract("float32")
        assert not from_cache and full.dtype == np.float32
        np.testing.assert_allclose(full, extractor.predict(images, verbose=0), rtol=1e-6, atol=1e-6)
        assert not np.array_equal(full, half.astype(np.float32))  # float16 rounding shows
        _, from_cache, _ = extract("bfloat16")
        assert not from_cache
        again, from_cache, _ = extract("float32")
        assert from_cache and np.array_equal(again, full)
    finally:
        devices.set_precision("float32")
    assert len(list(tmp_path.glob("features-*"))) == 3

def test_the_feature_sets_of_one_extraction_share_the_memory_budget(tmp_path, monkeypatch):
    """Two sets of 600 KB of features and a budget of 1 MB: the first stays in memory, the
    second on disk, read as the same values (the budget bounds them together, not each)."""
    from vgg_transfer import features

    rng = np.random.default_rng(0)
    extractor = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256)])  # 1 KB of float32 a row
    sets = {name: rng.standard_normal((600, 64)).astype("float32") for name in ("train", "val")}
    monkeypatch.setenv(stored.MEMORY_BUDGET_VARIABLE, "1")
    cached, _ = features.cached_features(extractor, sets, 100, 0, cache_dir=tmp_path)
    assert isinstance(cached["train"], np.ndarray) and isinstance(cached["val"], stored.StoredArray)
    np.testing.assert_allclose(cached["val"][:], extractor.predict(sets["val"], verbose=0), rtol=1e-5, atol=1e-6)


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


@pytest.mark.slow
def test_benchmark_measures_a_tiny_size(tmp_path):
    import json

    import benchmark
    from vgg_transfer import cli

    argv = ["--image-sizes", "32,33", "--batch-size", "4", "--min-seconds", "0.2", "--matmul-size", "256",
            "--out", str(tmp_path)]
    assert cli.run(benchmark.main, vars(benchmark), argv, pretrained=False) == 0  # as its last line runs it
    (report,) = (tmp_path / "benchmark").glob("benchmark-*.json")
    result = json.loads(report.read_text())
    measured = {entry["precision"]: entry for entry in result["precisions"]}
    assert sorted(measured) == sorted(devices.offered_precisions())  # every precision this device offers
    for entry in measured.values():
        _check_benchmark_row(entry)


def _check_benchmark_row(entry):
    row, second_size = entry["results"]
    assert second_size["image_size"] == 33 and second_size["dtype_policy"] == entry["dtype_policy"]
    peak = entry["matmul_tflops"] * 1e12  # this precision's own peak
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
    assert entry["dtype_policy"] == devices.DTYPE_POLICIES[entry["precision"]]


def test_the_mistakes_picture_shows_each_classs_most_confident_mistakes_first(tmp_path):
    """Three classes of 8x8 images; class 0 has four mistakes (two shown), class 1 one, class 2 none."""
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    predicted = np.array([1, 2, 0, 1, 2, 0, 1, 2])
    confidence = np.array([0.5, 0.9, 0.99, 0.7, 0.9, 0.6, 0.8, 0.9])
    probabilities = np.full((8, 3), 0.0)
    probabilities[np.arange(8), predicted] = confidence
    probabilities[np.arange(8), (predicted + 1) % 3] = 1 - confidence
    images = np.random.default_rng(0).integers(0, 255, (8, 8, 8, 3), np.uint8)
    shown = pictures.plot_confident_mistakes(tmp_path / "mistakes.png", images, labels, probabilities,
                                             ["a", "b", "c"], "title", per_class=2)
    assert shown == [[1, 4], [5], []]  # ties in the order of the test set; a right answer is never shown
    with Image.open(tmp_path / "mistakes.png") as picture:
        assert picture.format == "PNG" and picture.height > picture.width
