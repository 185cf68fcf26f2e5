"""tpo.fit: the same run as a hand-written loop, the rule's swap epoch, clear errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase_optax as tpo

N, BATCH, STEPS = 96, 16, 6  # six mini-batches per epoch


def _problem():
    """A linear classifier on separable 2-D data: a loss, its aux, the data."""
    x = jax.random.normal(jax.random.key(0), (N, 2))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(jnp.int32)
    data = {"x": x, "y": y}

    def loss_fn(w, batch):
        logits = batch["x"] @ w["kernel"] + w["bias"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return jnp.mean(loss), logits

    def num_errors(logits, batch):
        return jnp.sum(jnp.argmax(logits, -1) != batch["y"])

    params = {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}
    return loss_fn, num_errors, params, data


def _hand_loop(loss_fn, params, data, tx, epochs, key, loss_takes_key=False):
    """What fit promises, written out step by step in Python."""
    if loss_takes_key:  # fresh keys in the first phase, None after
        keyed = loss_fn
        loss_fn = lambda p, batch, k=None: keyed(p, batch, k)  # noqa: E731
    value_fn = lambda p, batch: loss_fn(p, batch)[0]  # noqa: E731
    keyed_grad = jax.jit(jax.value_and_grad(lambda p, b, k: loss_fn(p, b, k)[0]))
    update = jax.jit(
        lambda g, s, p, v, b: tx.update(
            g, s, p, value=v, grad=g, value_fn=value_fn, batch=b
        )
    )
    grad_fn = jax.jit(jax.value_and_grad(value_fn))
    reuse = jax.jit(
        lambda p, s: optax.value_and_grad_from_state(lambda q: value_fn(q, data))(
            p, state=s
        )
    )
    state = tx.init(params)
    for epoch in range(epochs):
        if bool(state.in_second_phase):
            value, grad = reuse(params, state)
            updates, state = update(grad, state, params, value, data)
            params = optax.apply_updates(params, updates)
            continue
        epoch_key = jax.random.fold_in(key, epoch)
        order = jax.random.permutation(epoch_key, N)
        step_keys = jax.random.split(jax.random.fold_in(epoch_key, 1), STEPS)
        for i in range(STEPS):
            if bool(state.in_second_phase):
                break  # the swap fired mid-epoch: fit holds the rest
            rows = order[i * BATCH : (i + 1) * BATCH]
            batch = {name: x[rows] for name, x in data.items()}
            if loss_takes_key:
                value, grad = keyed_grad(params, batch, step_keys[i])
            else:
                value, grad = grad_fn(params, batch)
            updates, state = update(grad, state, params, value, batch)
            params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize(
    "swap_step, swap_epoch, phases",
    [(2 * STEPS, 2, [1, 1, 2, 2, 2]), (2 * STEPS + 3, 3, [1, 1, 1, 2, 2])],
)
def test_fit_is_the_hand_written_loop_bit_for_bit(swap_step, swap_epoch, phases):
    loss_fn, _, params, data = _problem()
    tx = tpo.two_phase(optax.adam(0.1), swap=tpo.swap.at_step(swap_step))
    key = jax.random.key(3)
    result = tpo.fit(
        loss_fn, params, data, tx=tx, batch_size=BATCH, epochs=5, key=key, has_aux=True
    )
    expected, state = _hand_loop(loss_fn, params, data, tx, 5, key)
    chex.assert_trees_all_equal(result.params, expected)
    # A swap mid-epoch holds the epoch's remaining steps: CG never sees a
    # mini-batch, and the second phase starts with the next epoch.
    assert result.swap_epoch == swap_epoch
    assert int(result.state.swap_step) == int(state.swap_step) == swap_step
    assert [r["phase"] for r in result.history] == phases
    # The first phase spent a value and gradient per step it ran, none on
    # the held ones.
    spent = result.history[swap_epoch - 1]["forward_passes"]
    assert spent == pytest.approx(3.0 * swap_step * BATCH / N)


def test_a_loss_that_takes_a_key_gets_a_fresh_one_per_first_phase_step():
    loss_fn, _, params, data = _problem()

    def dropout_loss(w, batch, key):  # input dropout, off when key is None
        x = batch["x"]
        if key is not None:
            x = jnp.where(jax.random.bernoulli(key, 0.7, x.shape), x / 0.7, 0.0)
        return loss_fn(w, {"x": x, "y": batch["y"]})

    tx = tpo.two_phase(optax.adam(0.1), swap=tpo.swap.at_step(2 * STEPS))
    key = jax.random.key(3)
    kwargs = dict(tx=tx, batch_size=BATCH, epochs=4, key=key, has_aux=True)
    result = tpo.fit(dropout_loss, params, data, loss_takes_key=True, **kwargs)
    expected, _ = _hand_loop(dropout_loss, params, data, tx, 4, key, True)
    chex.assert_trees_all_equal(result.params, expected)
    plain = tpo.fit(loss_fn, params, data, **kwargs)
    assert not np.array_equal(result.params["kernel"], plain.params["kernel"])


def test_value_and_grad_from_state_is_optaxs_on_plain_pytrees():
    loss_fn, _, params, data = _problem()
    value_fn = lambda p: loss_fn(p, data)[0]  # noqa: E731
    opt = tpo.conjugate_gradient()
    ours = jax.jit(tpo.value_and_grad_from_state(value_fn))
    theirs = jax.jit(optax.value_and_grad_from_state(value_fn))
    state = opt.init(params)
    for _ in range(3):
        value, grad = ours(params, state=state)
        chex.assert_trees_all_equal((value, grad), theirs(params, state=state))
        updates, state = opt.update(
            grad, state, params, value=value, grad=grad, value_fn=value_fn
        )
        params = optax.apply_updates(params, updates)
    with pytest.raises(ValueError, match="no line search that stores its gradient"):
        ours(params, state=optax.adam(0.1).init(params))


def test_default_rule_swaps_on_the_epoch_its_replay_names():
    loss_fn, num_errors, params, data = _problem()
    tx = tpo.two_phase(optax.adam(0.1), swap=tpo.swap.default(steps_per_epoch=STEPS))
    result = tpo.fit(
        loss_fn,
        params,
        data,
        tx=tx,
        batch_size=BATCH,
        epochs=40,
        key=jax.random.key(0),
        has_aux=True,
        num_errors=num_errors,
    )
    first = [r for r in result.history if r["phase"] == 1]
    replayed = tpo.swap.replay(
        tpo.swap.any_of(tpo.swap.fitted(), tpo.swap.plateau()),
        value=[r["train_loss"] for r in first],
        num_errors=[r["num_errors"] for r in first],
    )
    assert replayed is not None
    assert result.swap_epoch == replayed + 1


def test_the_default_tx_never_swaps_in_the_last_fifth_of_the_epochs():
    loss_fn, num_errors, params, data = _problem()
    data = {"x": 30.0 * data["x"], "y": data["y"]}  # fitted from epoch 10
    kwargs = dict(batch_size=BATCH, key=jax.random.key(0), has_aux=True)
    run = functools.partial(tpo.fit, loss_fn, params, data, num_errors=num_errors)
    long = run(epochs=40, **kwargs)
    assert long.swap_epoch == 20  # ten fitted epochs in a row
    # 25 epochs: the swap may come after 25 - 5 = 20 of them.
    assert run(epochs=25, **kwargs).swap_epoch == 20
    # 23: only after 19 at the latest, so Adam runs to the end: plain Adam.
    short = run(epochs=23, **kwargs)
    assert short.swap_epoch is None
    adam = run(epochs=23, tx=optax.adam(1e-3), **kwargs)
    losses = [r["train_loss"] for r in short.history]
    assert losses == [r["train_loss"] for r in adam.history]


def test_forward_passes_are_counted_from_the_searches():
    loss_fn, _, params, data = _problem()
    tx = tpo.two_phase(optax.adam(0.1), swap=tpo.swap.at_step(STEPS))
    result = tpo.fit(
        loss_fn,
        params,
        data,
        tx=tx,
        batch_size=BATCH,
        epochs=4,
        key=jax.random.key(1),
        has_aux=True,
    )
    fpe = [r["forward_passes"] for r in result.history]
    assert fpe[0] == 3.0  # one epoch of value-and-gradient steps
    # The second phase's first step computes its value and gradient (3),
    # later ones get them from the search; each search costs its values
    # (1 each) and its gradients (2 more each).
    search = tpo.find_linesearch_state(result.state)
    assert fpe[1] - fpe[0] >= 3.0 + 1.0
    last = int(search.info.num_evaluations) + 2 * int(search.info.num_gradients)
    assert fpe[3] - fpe[2] == last


def test_keep_best_returns_the_best_validation_epochs_params():
    loss_fn, _, params, data = _problem()
    x = jax.random.normal(jax.random.key(9), (40, 2))
    validation = {"x": x, "y": (x[:, 0] - 0.5 * x[:, 1] > 0).astype(jnp.int32)}
    kwargs = dict(
        tx=optax.adam(0.3),
        batch_size=BATCH,
        key=jax.random.key(2),
        has_aux=True,
        validation=validation,
    )

    def metrics_fn(w, batch):  # a scalar and a vector: both recorded
        logits = batch["x"] @ w["kernel"] + w["bias"]
        wrong = jnp.argmax(logits, -1) != batch["y"]
        return {
            "errors": jnp.sum(wrong),
            "per_class": jnp.bincount(wrong * 1, length=2),
        }

    best = tpo.fit(
        loss_fn, params, data, epochs=8, keep="best", metrics_fn=metrics_fn, **kwargs
    )
    losses = [r["validation_loss"] for r in best.history]
    assert isinstance(best.history[-1]["metrics"]["errors"], int)
    assert len(best.history[-1]["metrics"]["per_class"]) == 2
    assert best.best_epoch == int(np.argmin(losses))
    assert best.swap_epoch is None  # plain Adam: the baseline through the same call
    again = tpo.fit(loss_fn, params, data, epochs=best.best_epoch + 1, **kwargs)
    chex.assert_trees_all_equal(best.params, again.params)


def test_chunked_second_phase_takes_the_same_steps():
    loss_fn, _, params, data = _problem()
    tx = tpo.two_phase(optax.adam(0.1), swap=tpo.swap.at_step(STEPS))
    kwargs = dict(
        tx=tx, batch_size=BATCH, epochs=4, key=jax.random.key(1), has_aux=True
    )
    whole = tpo.fit(loss_fn, params, data, **kwargs)
    chunked = tpo.fit(loss_fn, params, data, chunk_size=32, **kwargs)
    chex.assert_trees_all_close(chunked.params, whole.params, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(data={"x": jnp.zeros((96, 2)), "y": jnp.zeros(95)}),
            "same number of examples",
        ),
        (dict(batch_size=97), r"batch_size must be an integer in \[1, 96\]"),
        (dict(num_errors=lambda aux, batch: 0, has_aux=False), "has_aux=True"),
        (
            dict(validation={"x": jnp.zeros((4, 2))}),
            "validation must have data's structure",
        ),
        (dict(keep="best"), "needs validation"),
        (dict(epochs=0), "epochs must be an integer >= 1"),
    ],
)
def test_bad_input_gets_one_clear_error(change, message):
    loss_fn, _, params, data = _problem()
    kwargs = dict(
        data=data, batch_size=BATCH, epochs=1, key=jax.random.key(0), has_aux=True
    )
    kwargs.update(change)
    data = kwargs.pop("data")
    with pytest.raises(ValueError, match=message):
        tpo.fit(loss_fn, params, data, **kwargs)
