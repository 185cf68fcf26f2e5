"""The pydoc-text dataset and the character transformer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax", reason="the experiments need flax")
from flax import nnx  # noqa: E402

from experiments import config as config_lib  # noqa: E402
from experiments import data  # noqa: E402
from experiments import models  # noqa: E402
from experiments import train  # noqa: E402
from experiments import trainer as trainer_lib  # noqa: E402


def test_topics_split_deterministically_and_disjointly_about_nine_to_one():
    topics = data.pydoc_topics()
    train_topics, val_topics = data.split_topics(topics)
    assert (train_topics, val_topics) == data.split_topics(dict(topics))
    assert not set(train_topics) & set(val_topics)
    assert set(train_topics) | set(val_topics) == set(topics)
    held = sum(len(topics[name]) for name in val_topics)
    total = sum(len(text) for text in topics.values())
    assert 0.1 <= held / total <= 0.12
    # No validation topic's text reaches the training sequences.
    first, second = data.load("pydoc-text"), data.load("pydoc-text")
    np.testing.assert_array_equal(first.x_train, second.x_train)
    np.testing.assert_array_equal(first.y_val, second.y_val)
    vocabulary = first.vocabulary
    decode = lambda ids: "".join(vocabulary[i - 1] if i else "\0" for i in ids)  # noqa: E731
    training_text = "".join(decode(row) for row in first.x_train)
    longest = max(val_topics, key=lambda name: len(topics[name]))
    assert topics[longest][:200] not in training_text
    assert topics[train_topics[0]][:200] in training_text


def test_sequences_are_characters_and_their_successors():
    dataset = data.load("pydoc-text")
    assert dataset.x_train.shape[1] == data.TEXT_LENGTH
    assert dataset.x_train.dtype == np.int32 and dataset.y_train.dtype == np.int32
    # The labels are the inputs shifted by one, across sequence boundaries too.
    np.testing.assert_array_equal(dataset.y_train[:, :-1], dataset.x_train[:, 1:])
    np.testing.assert_array_equal(dataset.y_train[:-1, -1], dataset.x_train[1:, 0])
    assert dataset.num_classes == len(dataset.vocabulary) + 1
    assert dataset.x_train.min() >= 1  # Every training character is known.
    assert dataset.x_val.max() < dataset.num_classes


def test_unknown_characters_map_to_the_unknown_id():
    x, y = data.text_sequences("ab?ba", "ab", length=2)
    assert x.tolist() == [[1, 2], [data.UNKNOWN, 2]]
    assert y.tolist() == [[2, data.UNKNOWN], [2, 1]]


@pytest.mark.parametrize("name", list(models.TEXT_VARIANTS))
def test_a_prediction_never_depends_on_a_later_character(name):
    model = models.create_model(name, "pydoc-text", (32,), 50, seed=0)
    characters = jax.random.randint(jax.random.key(1), (3, 32), 1, 50)
    changed = characters.at[:, 20:].set((characters[:, 20:] + 7) % 50)
    before, after = model(characters), model(changed)
    assert before.shape == (3, 32, 50)
    # Positions 0..19 see only characters 0..19: their logits do not move.
    np.testing.assert_array_equal(before[:, :20], after[:, :20])
    assert not np.allclose(before[:, 20:], after[:, 20:])


def test_the_loss_per_position_matches_a_hand_computation():
    outputs = jnp.array([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]])  # (1, 2, 3)
    labels = jnp.array([[0, 2]])
    p = np.exp(np.array(outputs[0]))
    p /= p.sum(-1, keepdims=True)
    targets = np.eye(3)[[0, 2]]
    expected_mse = np.mean((p - targets) ** 2)  # over positions and classes
    expected_xent = -np.mean(np.log(p[[0, 1], [0, 2]]))  # per character
    assert float(models.softmax_mse_loss(outputs, labels)) == pytest.approx(
        expected_mse, rel=1e-6
    )
    assert float(models.xent_loss(outputs, labels)) == pytest.approx(
        expected_xent, rel=1e-6
    )


def test_text_models_and_datasets_do_not_mix(capsys):
    with pytest.raises(ValueError, match="does not take text"):
        models.create_model("vgg5", "pydoc-text", (64,), 104)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--dataset", "pydoc-text", "--model", "vit-mlp"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --model: 'vit-mlp' does not fit --dataset 'pydoc-text'" in error
    from experiments import compare
    from experiments import fig5

    with pytest.raises(SystemExit):
        compare.main(["--dataset", "digits", "--models", "char-transformer"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --models: 'char-transformer' does not fit --dataset" in error
    with pytest.raises(SystemExit):
        fig5.main(["--datasets", "pydoc-text", "--models", "vgg5"])
    assert "none of them takes" in capsys.readouterr().err


@pytest.mark.slow
def test_training_reports_accuracy_and_bits_per_character(tmp_path):
    config = config_lib.Config.of(
        model="char-transformer-nomlp",
        dataset="pydoc-text",
        optimizer="adam",
        epochs=1,
        batch_size=512,
        loss="xent",
        progress=False,
        out=str(tmp_path),
    )
    trainer = trainer_lib.Trainer(config)
    rows = train.train(config)
    assert len(rows) == 1
    for row in rows:
        assert 0.0 < row["train_acc"] < 1.0 and 0.0 < row["val_acc"] < 1.0
        assert row["val_bpc"] == pytest.approx(row["val_loss"] / np.log(2.0))
    # A uniform guess over 104 characters is 6.7 bits; it learned something.
    assert rows[-1]["val_bpc"] < 6.0
    # The accuracy is per character: recompute it by hand on the validation set.
    x, y = trainer.data.x_val, trainer.data.y_val
    loss, accuracy = trainer.evaluate(x, y)
    predicted = np.argmax(np.asarray(trainer.apply(trainer.params, x)), -1)
    assert accuracy == pytest.approx(np.mean(predicted == y), abs=1e-9)
    assert 0.0 < accuracy < 1.0 and np.isfinite(loss)


@pytest.mark.parametrize("name", list(models.TEXT_VARIANTS))
def test_text_models_forward_and_backward_with_finite_gradients(name):
    model = models.create_model(name, "pydoc-text", (16,), 30)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    characters = jax.random.randint(jax.random.key(0), (3, 16), 0, 30)

    def loss(params):
        outputs = nnx.merge(graphdef, params, rest)(characters)
        return models.xent_loss(outputs, jnp.roll(characters, -1, axis=1))

    value, grads = jax.value_and_grad(loss)(params)
    # An untrained model is near a uniform guess over 30 characters.
    assert abs(float(value) - np.log(30)) < 1.0
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(g).all() for g in leaves)
    assert all(float(jnp.abs(g).sum()) > 0 for g in leaves)
