"""`layers.convolution_attention` (Can Vision Transformers Perform Convolution?): the attention
layer built from a k×k kernel equals `lax.conv` with zero padding, forward and gradient."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import layers
from tests import reference


def _conv(images, kernel, bias):
  return jax.lax.conv_general_dilated(images, kernel, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias


@pytest.mark.parametrize("k, grid", [(3, (4, 5)), (5, (5, 3))])
def test_attention_layer_equals_the_convolution(k, grid):
  d = 3
  kernel = reference.normal(0, (k, k, d, d))
  bias = reference.normal(1, (d,))
  images = reference.normal(2, (2, *grid, d))
  layer, variables, mask = layers.convolution_attention(kernel, grid, bias)
  assert mask.shape == (1, k * k, grid[0] * grid[1], grid[0] * grid[1])
  shapes = nn.unbox(jax.eval_shape(layer.init, jax.random.key(0), images.reshape(2, -1, d)))
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(jnp.shape, variables)

  attention = lambda x, v: layer.apply(v, x.reshape(2, -1, d), mask=mask).reshape(x.shape)
  np.testing.assert_allclose(attention(images, variables), _conv(images, kernel, bias),
                             rtol=1e-5, atol=1e-5)

  # Gradients in the input, the kernel (the value projection) and the bias (the output's).
  cotangent = reference.normal(3, images.shape)
  grad_attention = jax.grad(lambda x, v: jnp.sum(attention(x, v) * cotangent), (0, 1))(
      images, variables)
  grad_conv = jax.grad(lambda x, w, b: jnp.sum(_conv(x, w, b) * cotangent), (0, 1, 2))(
      images, kernel, bias)
  value_grad = grad_attention[1]["params"]["value"]["kernel"]  # [d, k², d]
  np.testing.assert_allclose(grad_attention[0], grad_conv[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(value_grad.transpose(1, 0, 2).reshape(kernel.shape), grad_conv[1],
                             rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(grad_attention[1]["params"]["out"]["bias"], grad_conv[2],
                             rtol=1e-5, atol=1e-4)


def test_bad_kernels_and_grids_raise():
  with pytest.raises(ValueError, match="k odd"):
    layers.convolution_attention(np.zeros((2, 2, 3, 3)), (4, 4))
  with pytest.raises(ValueError, match="d channels to d"):
    layers.convolution_attention(np.zeros((3, 3, 2, 3)), (4, 4))
  with pytest.raises(ValueError, match="grid must be"):
    layers.convolution_attention(np.zeros((3, 3, 3, 3)), (4,))
  with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
    layers.convolution_attention(np.zeros((3, 3, 3, 3)), (4, 4), np.zeros(2))
