"""A TensorFlow/Keras multilayer perceptron behind the scikit-learn estimator contract.

The estimators persist like any scikit-learn one (with skops, see :mod:`mlops.artifacts`); the
Keras network travels inside as Keras's native ``.keras`` bytes, loaded in Keras's safe mode.
TensorFlow is imported only when one is built.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# the most rows predicted in one call of the network; a larger batch goes through
# ``model.predict`` in slices of this size
SMALL_BATCH = 1024


def _keras():
    import keras

    return keras


class _KerasMLP(BaseEstimator):
    def __init__(
        self,
        hidden_units: Sequence[int] = (64, 32),
        activation: str = "relu",
        dropout: float = 0.1,
        learning_rate: float = 1e-3,
        l2: float = 0.0,
        epochs: int = 100,
        batch_size: int = 32,
        patience: int = 10,
        random_state: int | None = None,
        verbose: int = 0,
    ) -> None:
        self.hidden_units = hidden_units
        self.activation = activation
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.l2 = l2
        self.epochs = epochs
        self.batch_size = batch_size
        self.patience = patience
        self.random_state = random_state
        self.verbose = verbose

    def validate_params(self) -> None:
        """Check hyperparameter values before training, as scikit-learn estimators do."""
        units = self.hidden_units
        if isinstance(units, (int, str)) or not all(isinstance(u, int) and u > 0 for u in units):
            raise ValueError(f"hidden_units must be a list of positive integers, got {units!r}.")

        def is_int(v: Any, low: int) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        checks = {
            "dropout": (lambda v: 0.0 <= float(v) < 1.0, "a float in [0, 1)"),
            "learning_rate": (lambda v: float(v) > 0, "a float > 0"),
            "l2": (lambda v: float(v) >= 0, "a float >= 0"),
            "epochs": (lambda v: is_int(v, 1), "an integer >= 1"),
            "batch_size": (lambda v: is_int(v, 1), "an integer >= 1"),
            "patience": (lambda v: is_int(v, 0), "an integer >= 0"),
        }
        for name, (check, expected) in checks.items():
            value = getattr(self, name)
            try:
                ok = check(value)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"The '{name}' parameter must be {expected}, got {value!r}.")

    # subclasses say what the output layer and loss are
    def _head(self, y: np.ndarray) -> tuple[int, str, str, list[str]]:
        raise NotImplementedError

    def _encode_target(self, y: np.ndarray) -> np.ndarray:
        return np.asarray(y)

    def fit(
        self, X: Any, y: Any, eval_set: tuple[Any, Any] | None = None, on_epoch_end=None
    ) -> _KerasMLP:
        keras = _keras()
        if self.random_state is not None:
            keras.utils.set_random_seed(int(self.random_state))
        X = np.asarray(X, dtype="float32")
        units, out_activation, loss, metrics = self._head(np.asarray(y))
        y_enc = self._encode_target(np.asarray(y))
        reg = keras.regularizers.L2(self.l2) if self.l2 else None
        layers: list[Any] = [keras.Input(shape=(X.shape[1],))]
        for width in self.hidden_units:
            layers.append(
                keras.layers.Dense(int(width), activation=self.activation, kernel_regularizer=reg)
            )
            if self.dropout:
                layers.append(keras.layers.Dropout(float(self.dropout)))
        layers.append(keras.layers.Dense(units, activation=out_activation))
        model = keras.Sequential(layers)
        model.compile(
            optimizer=keras.optimizers.Adam(float(self.learning_rate)), loss=loss, metrics=metrics
        )

        validation_data = None
        if eval_set is not None:
            validation_data = (
                np.asarray(eval_set[0], dtype="float32"),
                self._encode_target(np.asarray(eval_set[1])),
            )
        monitor = "val_loss" if validation_data is not None else "loss"
        callbacks: list[Any] = [
            keras.callbacks.EarlyStopping(
                monitor=monitor, patience=int(self.patience), restore_best_weights=True
            )
        ]
        if on_epoch_end is not None:
            callbacks.append(
                keras.callbacks.LambdaCallback(
                    on_epoch_end=lambda epoch, logs: on_epoch_end(
                        epoch, {k: float(v) for k, v in (logs or {}).items()}
                    )
                )
            )
        history = model.fit(
            X,
            y_enc,
            validation_data=validation_data,
            epochs=int(self.epochs),
            batch_size=int(self.batch_size),
            callbacks=callbacks,
            verbose=self.verbose,
        )
        self.model_ = model
        self.__dict__.pop("_forward_fn", None)  # a graph of the network fitted before, if any
        self.history_ = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        self.n_epochs_ = len(next(iter(self.history_.values()), []))
        self.n_features_in_ = X.shape[1]
        return self

    def _forward(self, X: Any) -> np.ndarray:
        X = np.asarray(X, dtype="float32")
        if X.shape[0] > SMALL_BATCH:  # memory stays bounded: Keras feeds it in slices
            return np.asarray(self.model_.predict(X, batch_size=SMALL_BATCH, verbose=0))
        # a scoring server's request is a few rows: ``model.predict`` costs tens of ms a call
        # (its data adapter and loop), an eager call a few ms (each layer's ops dispatched one
        # by one); one graph traced once answers in a fraction of a millisecond
        forward = self.__dict__.get("_forward_fn") or self._compile_forward()
        return np.asarray(forward(X))

    def _compile_forward(self) -> Callable[[np.ndarray], Any]:
        """The network as one TensorFlow graph over ``[rows, features]``, traced at its first
        call and kept (not persisted); a direct call where Keras runs on another backend."""
        keras, model = _keras(), self.model_
        if keras.backend.backend() != "tensorflow":
            forward: Callable[[np.ndarray], Any] = lambda X: model(X, training=False)  # noqa: E731
        else:
            import tensorflow as tf

            graph = tf.function(
                lambda x: model(x, training=False),
                input_signature=[tf.TensorSpec([None, self.n_features_in_], tf.float32)],
            )
            forward = lambda X: graph(tf.convert_to_tensor(X, dtype=tf.float32))  # noqa: E731
        self._forward_fn = forward
        return forward

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_forward_fn", None)  # rebuilt at the first prediction after loading
        model = state.pop("model_", None)
        if model is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.keras")
                model.save(path)
                with open(path, "rb") as fh:
                    state["_model_bytes"] = fh.read()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        blob = state.pop("_model_bytes", None)
        self.__dict__.update(state)
        if blob is not None:
            keras = _keras()
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "model.keras")
                with open(path, "wb") as fh:
                    fh.write(blob)
                self.model_ = keras.saving.load_model(path, compile=False, safe_mode=True)


class KerasMLPClassifier(ClassifierMixin, _KerasMLP):
    """Keras MLP classifier; expects integer-coded or arbitrary labels, exposes ``classes_``."""

    def _head(self, y: np.ndarray) -> tuple[int, str, str, list[str]]:
        self.classes_ = np.unique(y)
        return len(self.classes_), "softmax", "sparse_categorical_crossentropy", ["accuracy"]

    def _encode_target(self, y: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.classes_, y).astype("int32")

    def predict_proba(self, X: Any) -> np.ndarray:
        return self._forward(X)

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[np.argmax(self._forward(X), axis=1)]


class KerasMLPRegressor(RegressorMixin, _KerasMLP):
    """Keras MLP regressor (mean squared error loss)."""

    def _head(self, y: np.ndarray) -> tuple[int, str, str, list[str]]:
        return 1, "linear", "mse", ["mae"]

    def _encode_target(self, y: np.ndarray) -> np.ndarray:
        return np.asarray(y, dtype="float32")

    def predict(self, X: Any) -> np.ndarray:
        return self._forward(X).reshape(-1)
