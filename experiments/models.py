"""The paper's models in Flax NNX: four ViT variants and VGG5.

All ViT variants have 3 pre-norm encoders with 4 heads and embedding 64 and
classify from the mean of the encoder's output tokens:

=======================  =====================================================
name                     encoder
=======================  =====================================================
``vit-mlp``              attention (W_q, W_k, W_v, W_o) and a 256-unit GELU MLP
``vit-nomlp``            attention (W_q, W_k, W_v, W_o), no MLP
``vit-nomlp-wkewq``      one matrix W_qk for queries and keys, W_v, W_o; no MLP
``vit-nomlp-wkewq-wvwo`` W_qk only: the values are the input tokens and the
                         heads are concatenated without an output projection
=======================  =====================================================

``vgg5`` has five weight layers: three 3x3 convolutions (32, 64, 128 channels,
each followed by ReLU and 2x2 max-pooling) and two dense layers (256, ReLU,
then the outputs). Its convolutions are computed as one matrix product of the
nine shifted copies of the input (see :func:`conv_as_matmul`): the same
parameters and numbers as ``nnx.Conv`` to rounding, and on CPU several times
faster inside CG's line search.

Patch sizes (the paper gives none): 2 for the 8x8 digits (16 tokens), 4 for
MNIST's 28x28 (49 tokens, also for the offline ``mnist5k``) and for CIFAR's
32x32 (64 tokens); see :data:`PATCH_SIZES`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

EMBED = 64
HEADS = 4
ENCODERS = 3
MLP_UNITS = 256

PATCH_SIZES = {"digits": 2, "mnist5k": 4, "mnist": 4, "cifar10": 4, "cifar100": 4}

VIT_VARIANTS = {
    # name: (mlp, shared W_qk, value and output projections)
    "vit-mlp": (True, False, True),
    "vit-nomlp": (False, False, True),
    "vit-nomlp-wkewq": (False, True, True),
    "vit-nomlp-wkewq-wvwo": (False, True, False),
}
# Text: the ViT's encoders made causal, on characters (``pydoc-text``).
TEXT_VARIANTS = {
    # name: (mlp, shared W_qk, value and output projections)
    "char-transformer": (True, False, True),
    "char-transformer-nomlp": (False, False, True),
}
IMAGE_MODEL_NAMES = (*VIT_VARIANTS, "vgg5")
MODEL_NAMES = (*IMAGE_MODEL_NAMES, *TEXT_VARIANTS)


class Attention(nnx.Module):
    """Multi-head self-attention with the paper's weight-sharing options."""

    def __init__(
        self,
        shared_qk: bool,
        value_output: bool,
        causal: bool = False,
        *,
        rngs: nnx.Rngs,
    ):
        dense = lambda: nnx.Linear(EMBED, EMBED, use_bias=False, rngs=rngs)  # noqa: E731
        if shared_qk:
            self.w_qk = dense()
        else:
            self.w_q, self.w_k = dense(), dense()
        if value_output:
            self.w_v, self.w_o = dense(), dense()
        self.shared_qk, self.value_output = shared_qk, value_output
        self.causal = causal

    def __call__(self, x: jax.Array) -> jax.Array:
        split = lambda t: t.reshape(*t.shape[:-1], HEADS, EMBED // HEADS)  # noqa: E731
        if self.shared_qk:
            q = k = split(self.w_qk(x))
        else:
            q, k = split(self.w_q(x)), split(self.w_k(x))
        v = split(self.w_v(x) if self.value_output else x)
        heads = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
        out = heads.reshape(x.shape)
        return self.w_o(out) if self.value_output else out


class Encoder(nnx.Module):
    """Pre-norm transformer encoder block."""

    def __init__(
        self, mlp: bool, shared_qk: bool, value_output: bool, causal=False, *, rngs
    ):
        self.norm_attention = nnx.LayerNorm(EMBED, rngs=rngs)
        self.attention = Attention(shared_qk, value_output, causal, rngs=rngs)
        if mlp:
            self.norm_mlp = nnx.LayerNorm(EMBED, rngs=rngs)
            self.mlp_in = nnx.Linear(EMBED, MLP_UNITS, rngs=rngs)
            self.mlp_out = nnx.Linear(MLP_UNITS, EMBED, rngs=rngs)
        self.mlp = mlp

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.norm_attention(x))
        if self.mlp:
            x = x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm_mlp(x))))
        return x


class ViT(nnx.Module):
    """Vision transformer: patches, position embedding, encoders, mean pooling."""

    def __init__(
        self,
        variant: str,
        image_shape: tuple[int, int, int],
        num_outputs: int,
        patch: int,
        *,
        rngs: nnx.Rngs,
    ):
        mlp, shared_qk, value_output = VIT_VARIANTS[variant]
        height, width, channels = image_shape
        if height % patch or width % patch:
            raise ValueError(f"patch {patch} does not divide the image {image_shape}.")
        tokens = (height // patch) * (width // patch)
        self.patch = patch
        self.embed = nnx.Linear(patch * patch * channels, EMBED, rngs=rngs)
        self.position = nnx.Param(
            jax.random.normal(rngs.params(), (tokens, EMBED)) * 0.02
        )
        self.encoders = nnx.List(
            [Encoder(mlp, shared_qk, value_output, rngs=rngs) for _ in range(ENCODERS)]
        )
        self.norm = nnx.LayerNorm(EMBED, rngs=rngs)
        self.head = nnx.Linear(EMBED, num_outputs, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        b, h, w, c = images.shape
        p = self.patch
        patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = self.embed(patches.reshape(b, (h // p) * (w // p), p * p * c))
        x = x + self.position[...]
        for encoder in self.encoders:
            x = encoder(x)
        return self.head(self.norm(x).mean(axis=1))


class CharTransformer(nnx.Module):
    """The ViT's encoders, causal, on characters: a next-character model.

    Character and position embeddings, :data:`ENCODERS` pre-norm encoder
    blocks whose attention sees only the current and earlier positions, a
    final layer norm and a linear head that gives, at every position, the
    logits of the next character. The variants with and without the MLP are
    the paper's ``vit-mlp`` and ``vit-nomlp``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = CharTransformer("char-transformer", 16, 30, rngs=nnx.Rngs(0))
      >>> model(jnp.zeros((2, 16), jnp.int32)).shape  # (batch, position, vocab)
      (2, 16, 30)
    """

    def __init__(self, variant: str, length: int, vocabulary: int, *, rngs):
        mlp, shared_qk, value_output = TEXT_VARIANTS[variant]
        self.embed = nnx.Embed(vocabulary, EMBED, rngs=rngs)
        self.position = nnx.Param(
            jax.random.normal(rngs.params(), (length, EMBED)) * 0.02
        )
        self.encoders = nnx.List(
            [
                Encoder(mlp, shared_qk, value_output, causal=True, rngs=rngs)
                for _ in range(ENCODERS)
            ]
        )
        self.norm = nnx.LayerNorm(EMBED, rngs=rngs)
        self.head = nnx.Linear(EMBED, vocabulary, rngs=rngs)

    def __call__(self, characters: jax.Array) -> jax.Array:
        x = self.embed(characters) + self.position[...][: characters.shape[-1]]
        for encoder in self.encoders:
            x = encoder(x)
        return self.head(self.norm(x))


def conv_as_matmul(conv: nnx.Conv, x: jax.Array) -> jax.Array:
    """``conv(x)`` for a stride-1 "SAME" ``nnx.Conv``, as one matrix product.

    The input, padded, is shifted to each of the kernel's positions; the
    shifted copies are stacked along the channels and multiplied with the
    kernel reshaped to ``(kh * kw * in, out)``. Its gradient needs only slices,
    pads and matrix products. XLA's CPU backend runs the gradient of a
    convolution several times slower when it sits inside a ``while_loop`` or
    ``cond`` body, as CG's line search and ``two_phase``'s branches do
    (jax-ml/jax#12868): for VGG5 on the digits' full batch a value and
    gradient takes 0.42 s straight and 2.8 s inside a loop with
    ``nnx.Conv``, and 0.23 s in both places this way (BENCHMARKS.md,
    section 9).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> conv = nnx.Conv(2, 3, (3, 3), padding="SAME", rngs=nnx.Rngs(0))
      >>> x = jnp.ones((1, 5, 5, 2))
      >>> bool(jnp.allclose(conv_as_matmul(conv, x), conv(x), atol=1e-6))
      True
    """
    kernel = conv.kernel[...]
    kh, kw, cin, cout = kernel.shape
    _, h, w, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    shifted = jnp.concatenate(
        [padded[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)],
        axis=-1,
    )
    return shifted @ kernel.reshape(kh * kw * cin, cout) + conv.bias[...]


class VGG5(nnx.Module):
    """Three conv + max-pool stages and two dense layers, ReLU throughout.

    The convolutions' parameters are ``nnx.Conv``'s; they are applied with
    :func:`conv_as_matmul`.
    """

    def __init__(self, image_shape, num_outputs: int, *, rngs: nnx.Rngs):
        channels = (image_shape[2], 32, 64, 128)
        self.convs = nnx.List(
            [
                nnx.Conv(cin, cout, (3, 3), padding="SAME", rngs=rngs)
                for cin, cout in zip(channels[:-1], channels[1:], strict=True)
            ]
        )
        spatial = image_shape[0]
        for _ in self.convs:
            spatial = -(-spatial // 2)  # "SAME" pooling rounds up.
        self.dense = nnx.Linear(spatial * spatial * channels[-1], 256, rngs=rngs)
        self.out = nnx.Linear(256, num_outputs, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = images
        for conv in self.convs:
            x = nnx.max_pool(
                nnx.relu(self.convolve(conv, x)),
                window_shape=(2, 2),
                strides=(2, 2),
                padding="SAME",
            )
        x = nnx.relu(self.dense(x.reshape(x.shape[0], -1)))
        return self.out(x)

    def convolve(self, conv: nnx.Conv, x: jax.Array) -> jax.Array:
        """One convolution layer: :func:`conv_as_matmul`."""
        return conv_as_matmul(conv, x)


def create_model(
    name: str,
    dataset: str,
    image_shape: tuple[int, int, int],
    num_outputs: int,
    seed: int = 0,
) -> nnx.Module:
    """Builds one of :data:`MODEL_NAMES` for a dataset's input shape.

    Text models take the sequence length as ``image_shape`` ``(L,)`` and the
    vocabulary size as ``num_outputs``.
    """
    rngs = nnx.Rngs(seed)
    text_input = len(image_shape) == 1
    if (name in TEXT_VARIANTS) != text_input:
        kind = "text" if text_input else "images"
        choices = TEXT_VARIANTS if text_input else IMAGE_MODEL_NAMES
        raise ValueError(
            f"The model {name!r} does not take {kind} ({dataset}); choose one of "
            f"{tuple(choices)}."
        )
    if name in TEXT_VARIANTS:
        return CharTransformer(name, image_shape[0], num_outputs, rngs=rngs)
    if name == "vgg5":
        return VGG5(image_shape, num_outputs, rngs=rngs)
    if name in VIT_VARIANTS:
        return ViT(name, image_shape, num_outputs, PATCH_SIZES[dataset], rngs=rngs)
    raise ValueError(f"Unknown model {name!r}; choose one of {MODEL_NAMES}.")


def parameter_count(model: nnx.Module) -> int:
    """Number of trainable scalars."""
    params = nnx.state(model, nnx.Param)
    return sum(x.size for x in jax.tree.leaves(params))


LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def mse_loss(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """The paper's loss: mean squared error against one-hot targets."""
    targets = jax.nn.one_hot(labels, outputs.shape[-1], dtype=outputs.dtype)
    return jnp.mean((outputs - targets) ** 2)


def softmax_mse_loss(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean squared error between the softmax of the outputs and one-hot targets.

    The mean runs over examples and classes, as in a Keras classifier with a
    softmax output compiled with MSE. The paper's loss values are consistent
    with this head (every loss in its Table 1 stays below ``2 / classes``, the
    most a softmax output can lose), and only this head shows the rise and
    fall of the gradient norm that the swap detector looks for; with linear
    outputs (:func:`mse_loss`) the gradient norm is largest at initialisation.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = softmax_mse_loss(jnp.array([[0.0, 0.0]]), jnp.array([1]))
      >>> float(loss)  # ((0.5 - 0)^2 + (0.5 - 1)^2) / 2
      0.25
    """
    probabilities = jax.nn.softmax(outputs, axis=-1)
    return mse_loss(probabilities, labels)


def xent_loss(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy."""
    return optax.softmax_cross_entropy_with_integer_labels(outputs, labels).mean()


LOSSES: dict[str, LossFn] = {
    "softmax_mse": softmax_mse_loss,
    "mse": mse_loss,
    "xent": xent_loss,
}
DEFAULT_LOSS = "softmax_mse"
