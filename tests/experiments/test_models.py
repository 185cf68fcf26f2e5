"""The paper's models: shapes, gradients, and the architectural differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx", reason="the experiments need flax")
from experiments import models  # noqa: E402


def param_paths(model):
    return [
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        for path, _ in jax.tree_util.tree_leaves_with_path(
            nnx.to_pure_dict(nnx.state(model, nnx.Param))
        )
    ]


def count(paths, name):
    """Number of weight matrices of layers called ``name``."""
    return sum(f"/{p}".endswith(f"/{name}/kernel") for p in paths)


@pytest.mark.parametrize("name", models.IMAGE_MODEL_NAMES)
@pytest.mark.parametrize(
    "dataset, shape, classes",
    [
        ("digits", (8, 8, 1), 10),
        ("mnist", (28, 28, 1), 10),
        ("cifar100", (32, 32, 3), 100),
    ],
)
def test_forward_and_backward_on_a_tiny_batch(name, dataset, shape, classes):
    model = models.create_model(name, dataset, shape, classes)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    images = jax.random.normal(jax.random.key(0), (3, *shape))
    labels = jnp.array([0, 1, 2])

    def loss(params):
        outputs = nnx.merge(graphdef, params, rest)(images)
        assert outputs.shape == (3, classes)
        return models.mse_loss(outputs, labels)

    value, grads = jax.value_and_grad(loss)(params)
    assert np.isfinite(float(value))
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(g).all() for g in leaves)
    assert sum(float(jnp.abs(g).sum()) > 0 for g in leaves) == len(leaves)


def test_attention_matrices_per_variant():
    shape = (8, 8, 1)
    paths = {
        n: param_paths(models.create_model(n, "digits", shape, 10))
        for n in models.VIT_VARIANTS
    }
    for name in ("vit-mlp", "vit-nomlp"):
        assert [
            count(paths[name], w) for w in ("w_q", "w_k", "w_v", "w_o", "w_qk")
        ] == [3, 3, 3, 3, 0]
    # wkewq: exactly one query/key matrix per encoder, value and output kept.
    assert [
        count(paths["vit-nomlp-wkewq"], w) for w in ("w_q", "w_k", "w_qk", "w_v", "w_o")
    ] == [0, 0, 3, 3, 3]
    # wvwo: additionally none of the value and output matrices.
    assert [
        count(paths["vit-nomlp-wkewq-wvwo"], w)
        for w in ("w_q", "w_k", "w_qk", "w_v", "w_o")
    ] == [0, 0, 3, 0, 0]
    # Only vit-mlp has the MLP.
    assert count(paths["vit-mlp"], "mlp_in") == 3
    assert all(
        count(paths[n], "mlp_in") == 0 for n in models.VIT_VARIANTS if n != "vit-mlp"
    )


def test_parameter_counts_follow_from_the_architecture():
    e, m, tokens, patch_inputs, classes = 64, 256, 16, 4, 10
    embed = patch_inputs * e + e + tokens * e
    head = 2 * e + e * classes + classes  # Final LayerNorm and the dense head.
    attention_norm = 2 * e
    expected = {
        "vit-nomlp": embed + head + 3 * (attention_norm + 4 * e * e),
        "vit-nomlp-wkewq": embed + head + 3 * (attention_norm + 3 * e * e),
        "vit-nomlp-wkewq-wvwo": embed + head + 3 * (attention_norm + e * e),
        "vit-mlp": embed
        + head
        + 3 * (attention_norm + 4 * e * e + 2 * e + e * m + m + m * e + e),
    }
    for name, n in expected.items():
        model = models.create_model(name, "digits", (8, 8, 1), classes)
        assert models.parameter_count(model) == n, name
    vgg = models.create_model("vgg5", "digits", (8, 8, 1), classes)
    convs = (9 * 1 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 128 + 128)
    assert models.parameter_count(vgg) == convs + (128 * 256 + 256) + (256 * 10 + 10)
    assert len([p for p in param_paths(vgg) if p.endswith("kernel")]) == 5


def test_patch_sizes_are_documented_per_dataset():
    assert models.PATCH_SIZES == {
        "digits": 2,
        "mnist5k": 4,
        "mnist": 4,
        "cifar10": 4,
        "cifar100": 4,
    }
    with pytest.raises(ValueError, match="patch"):
        models.ViT("vit-mlp", (9, 9, 1), 10, 2, rngs=nnx.Rngs(0))


def test_mse_loss_is_mean_squared_error_on_one_hot_targets():
    outputs = jnp.array([[1.0, 0.0], [0.5, 0.5]])
    labels = jnp.array([0, 1])
    assert float(models.mse_loss(outputs, labels)) == pytest.approx(0.25 / 2)


def test_softmax_mse_loss_matches_a_hand_computation():
    outputs = jnp.array([[0.0, 0.0, 0.0], [jnp.log(2.0), 0.0, jnp.log(1.0)]])
    labels = jnp.array([2, 0])
    # Softmax rows: (1/3, 1/3, 1/3) and (2/4, 1/4, 1/4).
    first = (1 / 3) ** 2 + (1 / 3) ** 2 + (1 / 3 - 1) ** 2
    second = (2 / 4 - 1) ** 2 + (1 / 4) ** 2 + (1 / 4) ** 2
    expected = (first + second) / 6  # mean over 2 examples x 3 classes
    assert float(models.softmax_mse_loss(outputs, labels)) == pytest.approx(
        expected, rel=1e-6
    )
    assert models.LOSSES[models.DEFAULT_LOSS] is models.softmax_mse_loss


def test_softmax_mse_loss_is_at_most_two_over_the_classes():
    # The paper's Table 1 losses all lie below this bound of a softmax head.
    outputs = jnp.array([[50.0, 0.0, 0.0, 0.0]])
    worst = float(models.softmax_mse_loss(outputs, jnp.array([3])))
    assert worst == pytest.approx(2 / 4, rel=1e-6)


def test_unknown_model_raises():
    with pytest.raises(ValueError, match="vgg5"):
        models.create_model("resnet", "digits", (8, 8, 1), 10)


def test_conv_as_matmul_matches_nnx_conv_in_value_and_gradient():
    conv = nnx.Conv(3, 5, (3, 3), padding="SAME", rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (2, 7, 6, 3))
    np.testing.assert_allclose(
        models.conv_as_matmul(conv, x), conv(x), rtol=1e-5, atol=1e-5
    )

    graphdef, params = nnx.split(conv)

    def grads(apply):
        def loss(params, x):
            return jnp.sum(jnp.sin(apply(nnx.merge(graphdef, params), x)))

        return jax.grad(loss, argnums=(0, 1))(params, x)

    matmul, xla = grads(models.conv_as_matmul), grads(lambda c, x: c(x))
    # Kernel, bias and input gradients.
    assert len(jax.tree.leaves(matmul)) == 3
    for ours, theirs in zip(jax.tree.leaves(matmul), jax.tree.leaves(xla), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_vgg5_gradient_has_no_convolution_for_xla_to_slow_down_in_loops():
    # XLA's CPU backend runs convolution gradients inside while/cond bodies
    # several times slower (jax-ml/jax#12868); VGG5 uses none.
    vgg = models.create_model("vgg5", "digits", (8, 8, 1), 10)
    graphdef, params = nnx.split(vgg, nnx.Param)
    images = jnp.ones((4, 8, 8, 1))

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params)(images))

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    assert " convolution(" not in hlo
