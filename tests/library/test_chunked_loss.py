"""The chunked full-batch loss equals the one-pass loss, value and gradient."""

import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase_optax as tpo


def mlp_loss(params, x, y):
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] - y) ** 2)


def problem(dtype, n=1000):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (n, 5), dtype)
    y = jnp.sin(x @ jnp.linspace(-1.0, 1.0, 5, dtype=dtype))[:, None]
    params = {
        "w1": jax.random.normal(k2, (5, 16), dtype) / 5**0.5,
        "b1": jnp.zeros(16, dtype),
        "w2": jax.random.normal(k3, (16, 1), dtype) / 4.0,
    }
    return params, x, y


@pytest.mark.parametrize("chunk_size", [1000, 250, 300, 7, 4096])
def test_float64_value_and_gradient_equal_the_one_pass_ones(chunk_size):
    with jax.enable_x64(True):
        params, x, y = problem(jnp.float64)
        whole = jax.value_and_grad(mlp_loss)(params, x, y)
        chunked = jax.value_and_grad(tpo.chunked_loss(mlp_loss, chunk_size))(
            params, x, y
        )
        assert chunked[0].dtype == jnp.float64
        chex.assert_trees_all_close(chunked, whole, rtol=1e-12, atol=0)


@pytest.mark.parametrize("chunk_size", [256, 300])
def test_float32_equals_to_rounding_and_compiles_once(chunk_size):
    params, x, y = problem(jnp.float32)
    whole = jax.value_and_grad(mlp_loss)(params, x, y)
    loss = tpo.chunked_loss(mlp_loss, chunk_size)
    chex.clear_trace_counter()

    def value_and_grad(params, x, y):
        return jax.value_and_grad(loss)(params, x, y)

    step = jax.jit(chex.assert_max_traces(value_and_grad, n=1))
    for _ in range(3):
        chunked = step(params, x, y)
    # XLA's GPU reductions sum in another order than its CPU loops: on an
    # H200, 2 of 80 gradient entries differed by 3.0e-6 relative.
    rtol = 2e-6 if jax.default_backend() == "cpu" else 1e-5
    chex.assert_trees_all_close(chunked, whole, rtol=rtol, atol=1e-7)


def test_keyword_batches_and_unbatched_arguments():
    params, x, y = problem(jnp.float32, n=90)

    def loss(params, scale, *, images, labels):
        return scale * mlp_loss(params, images, labels)

    whole = loss(params, 2.0, images=x, labels=y)
    chunked = tpo.chunked_loss(loss, 40)(params, 2.0, images=x, labels=y)
    np.testing.assert_allclose(chunked, whole, rtol=2e-6)


def test_as_value_fn_cg_takes_the_same_steps():
    with jax.enable_x64(True):
        params, x, y = problem(jnp.float64, n=600)
        opt = tpo.conjugate_gradient()

        def run(value_fn):
            p, state = params, opt.init(params)
            for _ in range(5):
                value, grad = jax.value_and_grad(value_fn)(p, x, y)
                updates, state = opt.update(
                    grad, state, p, value=value, grad=grad, value_fn=value_fn, x=x, y=y
                )
                p = optax.apply_updates(p, updates)
            return p

        chex.assert_trees_all_close(
            run(tpo.chunked_loss(mlp_loss, 128)), run(mlp_loss), rtol=1e-9
        )


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_bad_chunk_size_raises(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        tpo.chunked_loss(mlp_loss, chunk_size)


def test_no_batch_says_what_it_needs():
    with pytest.raises(ValueError, match="leading axis"):
        tpo.chunked_loss(lambda p, s: p * s, 4)(1.0, 2.0)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        # 12 rows, at most 4 a chunk: 3 chunks (0,3,6,9 / 1,4,7,10 / 2,5,8,11),
        # each spanning 9.
        (12, 9.0),
        # 10 rows: 3 chunks of 3 (0,3,6 / 1,4,7 / 2,5,8) spanning 6, then row 9
        # alone (span 0), weighted by rows: (3 * 3 * 6 + 1 * 0) / 10.
        (10, 5.4),
    ],
)
def test_chunks_take_every_kth_row_and_the_rest_once(n, expected):
    # Not a mean: each chunk's span shows which rows it held (consecutive rows
    # would span 3 and 2).
    seen = []

    def span(params, x):
        seen.append(x.shape[0])
        return params * (jnp.max(x) - jnp.min(x))

    value = tpo.chunked_loss(span, 4)(1.0, jnp.arange(float(n)))
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    assert set(seen) == ({4} if n == 12 else {3, 1})  # Chunks, and the rest.


@pytest.mark.parametrize("linesearch", ["golden", "slope"])
def test_two_phase_with_value_and_grad_from_state_takes_the_same_steps(linesearch):
    with jax.enable_x64(True):
        params, x, y = problem(jnp.float64, n=700)
        search = (
            tpo.golden_section_linesearch()
            if linesearch == "golden"
            else tpo.slope_linesearch(store_grad=True)
        )
        opt = tpo.two_phase(
            optax.adam(1e-2),
            tpo.conjugate_gradient(linesearch=search),
            swap=tpo.swap.at_step(3),
        )

        def run(value_fn):
            # The slope search stores the last value and gradient for reuse.
            if linesearch == "slope":
                value_and_grad = optax.value_and_grad_from_state(value_fn)
            else:
                value_and_grad = lambda *a, state: jax.value_and_grad(value_fn)(*a)  # noqa: E731

            @jax.jit
            def step(p, state):
                value, grad = value_and_grad(p, x, y, state=state)
                updates, state = opt.update(
                    grad, state, p, value=value, grad=grad, value_fn=value_fn, x=x, y=y
                )
                return optax.apply_updates(p, updates), state, value

            p, state, values = params, opt.init(params), []
            for _ in range(8):
                p, state, value = step(p, state)
                values.append(value)
            return p, jnp.stack(values)

        chunked, whole = run(tpo.chunked_loss(mlp_loss, 128)), run(mlp_loss)
        chex.assert_trees_all_close(chunked, whole, rtol=1e-9)
        assert whole[1][-1] < 0.5 * whole[1][0]  # CG did descend.


def test_sharded_chunked_loss_equals_the_single_device_one():
    # Eight simulated CPU devices in a fresh process (XLA_FLAGS is read once).
    from _devices import run_with_devices

    script = pathlib.Path(__file__).with_name("_sharded_chunked_loss.py")
    result = json.loads(run_with_devices([str(script)]).strip().splitlines()[-1])
    assert result["devices"] == 8
    for case in result["cases"]:
        # Value and gradient: float64 to 1e-12, as unsharded and unchunked.
        assert case["value_rel_err"] < 1e-12, case
        assert case["grad_rel_err"] < 1e-12, case
        assert case["batch_sharded"], case
    # Where rows = chunks x devices x m, each device keeps to its own rows.
    local = [c for c in result["cases"] if c["aligned"]]
    assert local and all(not c["all_gather"] for c in local)


def test_hessian_vector_products_equal_the_one_pass_ones():
    # Forward over reverse through the custom derivative: what Lanczos uses.
    with jax.enable_x64(True):
        params, x, y = problem(jnp.float64, n=500)
        vector = jax.tree.map(jnp.ones_like, params)

        def hvp(loss):
            grad = jax.grad(lambda p: loss(p, x, y))
            return jax.jvp(grad, (params,), (vector,))[1]

        chunked = hvp(tpo.chunked_loss(mlp_loss, 64))
        chex.assert_trees_all_close(chunked, hvp(mlp_loss), rtol=1e-11)


def test_gradients_with_respect_to_the_batch_raise():
    params, x, y = problem(jnp.float32, n=100)
    loss = tpo.chunked_loss(mlp_loss, 30)
    with pytest.raises(ValueError, match="params only"):
        jax.grad(loss, argnums=1)(params, x, y)


def test_a_value_and_gradient_computes_each_chunk_forward_once():
    # The derivative runs forward and backward per chunk: the loss is traced
    # for the value-and-gradient loop and the rest, never re-run under remat.
    params, x, y = problem(jnp.float32, n=100)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(tpo.chunked_loss(mlp_loss, 30)))(
        params, x, y
    )
    assert "remat" not in str(jaxpr) and "checkpoint" not in str(jaxpr)


def test_complex_params_value_and_gradient_equal_the_one_pass_ones():
    # The custom JVP's slope is Re(sum(g t)) for complex leaves, so jax.grad
    # through it returns what jax.grad of the whole batch returns.
    x = jax.random.normal(jax.random.key(0), (50, 3))
    y = jax.random.normal(jax.random.key(1), (50,)) * (1 - 2j)

    def loss(w, x, y):
        return jnp.mean(jnp.abs(x @ w - y) ** 2)

    w = jnp.array([1 + 1j, -0.5j, 2.0], jnp.complex64)
    whole = jax.value_and_grad(loss)(w, x, y)
    chunked = jax.value_and_grad(tpo.chunked_loss(loss, 16))(w, x, y)
    chex.assert_trees_all_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert jnp.abs(whole[1].imag).max() > 0.1  # the imaginary parts count
