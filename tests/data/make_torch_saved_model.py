"""Writes torch_saved.keras and torch_saved_predictions.npz: a small model built like the main
job's (VGG16's preprocessing as built-in layers, a convolutional base, a head compiled on its
own, test-time flip averaging), trained a step and saved by Keras on the torch backend, with its
predictions on fixed images. The tests load it on this project's backends (torch stays out of
CI: its default wheel is gigabytes). Run once, where torch is installed:

    KERAS_BACKEND=torch PYTHONPATH=src python tests/data/make_torch_saved_model.py
"""

from pathlib import Path

import keras
import numpy as np

from vgg_transfer import models

assert keras.config.backend() == "torch", "run with KERAS_BACKEND=torch"
folder = Path(__file__).parent
keras.utils.set_random_seed(0)
shape = (8, 8, 3)
base = keras.Sequential([keras.Input(shape), keras.layers.Conv2D(4, 3, padding="same", activation="relu",
                                                                  name="block1_conv1")], name="vgg16_base")
head = keras.Sequential([keras.Input((8, 8, 4)), keras.layers.Flatten(), keras.layers.Dense(6, use_bias=False),
                         keras.layers.BatchNormalization(), keras.layers.Activation("relu"),
                         keras.layers.Dropout(0.5), keras.layers.Dense(3, activation="softmax")], name="head")
head.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
images = keras.Input(shape, dtype="uint8", name="image")
preprocessed = models.vgg16_preprocessing(shape, 8)(images)
own = head(base(preprocessed))
mirrored = head(base(models.mirror(shape)(preprocessed)))
model = keras.Model(images, keras.layers.Average(dtype="float32")([own, mirrored]), name="vgg16_frozen_functional")
model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (16, *shape), dtype=np.uint8)
model.fit(x, rng.integers(0, 3, 16), epochs=1, verbose=0)  # the optimizer gets a state to save
model.save(folder / "torch_saved.keras")
np.savez_compressed(folder / "torch_saved_predictions.npz", images=x, probabilities=model.predict(x, verbose=0))
print("written:", folder / "torch_saved.keras", keras.__version__)
