"""Datasets: the offline digits split, the TFDS path (mocked), and batching."""

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


def test_unknown_dataset_raises():
    with pytest.raises(ValueError, match="digits"):
        data.load("imagenet")
