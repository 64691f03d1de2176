"""`layers.HyenaOperator`: the Hyena operator with its own projections, on sequences and
images of any length (the `hyena` op itself is tested in `tests/test_ops_hyena.py`)."""
import jax
import numpy as np
import pytest

from big_attn import layers
from tests import reference as ref


def test_hyena_operator_sequence_image_and_any_length():
  op = layers.HyenaOperator(num_heads=2, max_len=10)
  x = ref.normal(0, (2, 10, 8))
  image = ref.normal(1, (2, 3, 4, 8))
  pixel = layers.HyenaOperator()  # HyenaPixel: 2-D filters scaled to each image

  @jax.jit
  def run(x, image):
    variables = op.init(jax.random.key(0), x, is_causal=True)
    y, prefix = (op.apply(variables, a, is_causal=True) for a in (x, x[:, :6]))
    pixel_vars = pixel.init(jax.random.key(1), image)
    out = pixel.apply(pixel_vars, image)
    flat = pixel.apply(pixel_vars, image.reshape(2, 12, 8), grid=(3, 4))
    crop = pixel.apply(pixel_vars, image[:, :2, :3])
    return variables, y, prefix, out, flat, crop

  variables, y, prefix, out, flat, crop = run(x, image)
  assert y.shape == x.shape and np.all(np.isfinite(y))
  # Causal: a prefix gives the prefix of the outputs; the same weights serve any length.
  np.testing.assert_allclose(prefix, y[:, :6], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out.reshape(2, 12, 8), flat, rtol=1e-5, atol=1e-6)
  assert np.abs(crop - out[:, :2, :3]).max() > 1e-4  # not causal: the crop loses context
  with pytest.raises(ValueError, match="max_len"):
    layers.HyenaOperator(num_heads=2, max_len=8).apply(variables, x)
  with pytest.raises(ValueError, match="HyenaOperator takes"):
    op.apply(variables, x[0])
  with pytest.raises(ValueError, match="grid is read off"):
    pixel.apply(variables, image, grid=(3, 4))
