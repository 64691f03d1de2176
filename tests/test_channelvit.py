"""ChannelViT (`vit` with `channel_tokens`; Channel Vision Transformers: An Image Is Worth C x
16 x 16 Words): variants and parameter counts, the per-channel patch embedding against NumPy,
the token grid of 2-D ops, a training step, the digits input's derived channels, main."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_attn import data
from big_attn import models
from big_attn.models import vit
from tests.test_convnext import full_size_count, images
from tests.model_checks import encoder_grids, train_digits_config
from tests.test_train import _config_module
from tests.test_vit import check_affine_map, check_trains

TINY = dict(width=8, depth=1, num_heads=2, patch_size=(4, 4), channel_tokens=True,
            pool_type="cls")
# ViT's counts with a class token (Ti 5.7M, S 22M, B 86M): ChannelViT's patch projection
# reads one channel instead of three and it adds an embedding per channel.
VIT = {"Ti": (5.7e6, 5_717_032, 192), "S": (22e6, 22_049_896, 384),
       "B": (86e6, 86_566_120, 768)}


class _Embed(nn.Module):
  @nn.compact
  def __call__(self, x):
    return vit.embed_patches(x, 4, (2, 2), "learn", jnp.float32, jnp.float32,
                             channel_tokens=True)


def _embed_reference(x, p, patch=2):
  """float64 NumPy: every channel's patches (row-major) through the one single-channel
  projection, plus the position embedding of the patch and the embedding of the channel;
  channel-major tokens."""
  x = np.asarray(x, np.float64)
  n, h, w, c = x.shape
  gh, gw = h // patch, w // patch
  kernel = np.asarray(p["embedding"]["kernel"], np.float64)[:, :, 0]  # [patch, patch, width]
  patches = x.reshape(n, gh, patch, gw, patch, c).transpose(0, 5, 1, 3, 2, 4)
  out = np.einsum("ncghij,ijd->ncghd", patches, kernel) + np.asarray(p["embedding"]["bias"])
  out = out.reshape(n, c, gh * gw, -1) + np.asarray(p["posemb"]["pos_embedding"])
  out = out + np.asarray(p["channel_embedding"]["embedding"])[None, :, None]
  return out.reshape(n, c * gh * gw, -1)


def test_decode_variant():
  assert vit.decode_variant("ChannelViT-S/16") == dict(
      width=384, depth=12, mlp_dim=1536, num_heads=6, channel_tokens=True, pool_type="cls",
      patch_size=(16, 16))
  model = vit.Model(num_classes=10, variant="ChannelViT-Ti/16")
  assert model.channel_tokens and model.pool_type == "cls" and models.get("vit") is vit
  with pytest.raises(ValueError, match="ChannelViT sizes Ti, S, B"):
    vit.decode_variant("ChannelViT-L/16")


@pytest.mark.parametrize("variant", [
    "S", pytest.param("Ti", marks=pytest.mark.extended),
    pytest.param("B", marks=pytest.mark.extended)])
def test_parameter_counts_of_the_variants(variant):
  (paper, vit_count, width), c = VIT[variant], 3
  n = full_size_count(vit.Model(num_classes=1000, variant=f"ChannelViT-{variant}/16"))
  assert n == vit_count + width - (c - 1) * 16 * 16 * width + c * width, n
  assert abs(n - paper) / paper < 0.02, (variant, n)


def test_channel_embedding_matches_numpy_forward_and_gradient():
  x = jax.random.normal(jax.random.key(0), (2, 4, 6, 3))
  embed = _Embed()
  params = nn.meta.unbox(embed.init(jax.random.key(1), x)["params"])
  params = jax.tree.map(lambda p: p + 0.1, params)  # nonzero biases
  assert params["channel_embedding"]["embedding"].shape == (3, 4)
  check_affine_map(lambda t: embed.apply({"params": params}, t),
                   lambda t: _embed_reference(t, params), x)


def test_token_grid_and_training_step():
  x = images(batch=3, size=8)  # 3 channels of 2x2 patches: 12 tokens and the class token
  assert encoder_grids(vit.Model(num_classes=3, attention="neighborhood", **TINY), x) == [
      ((13, 8), (6, 2))]  # the channels' grids stacked along the height
  params = check_trains(vit.Model(num_classes=3, head_zeroinit=False, **TINY), x)
  assert params["embedding"]["kernel"].shape == (4, 4, 1, 8)


def test_digits_config_derives_channels():
  config = _config_module("vit_digits").get_config("family=channelvit")
  assert config.model.channel_tokens and config.input.channels == "derived"
  assert data.dataset_info(config.input)["image_shape"] == (16, 16, 3)
  batch = next(iter(data.get_dataset(dict(config.input, num_threads=1, prefetch=1),
                                     split="test", batch_size=4, seed=0, train=False)))
  image = np.asarray(batch["image"], np.float64)
  gy, gx = np.gradient((image[..., 0] + 1) / 2, axis=(1, 2))
  np.testing.assert_allclose(image[..., 1], 2 * gx, atol=1e-5)
  np.testing.assert_allclose(image[..., 2], 2 * gy, atol=1e-5)
  assert np.std(image[..., 1]) > 0.05
  with pytest.raises(ValueError, match="channels must be 1, 3 or 'derived'"):
    data.dataset_info(dict(config.input, channels="rgb"))


def test_digits_config_trains_through_main(tmp_path):
  # the one default run through main of the CrossViT, TNT and ChannelViT digits configs: the
  # family that compiles fastest (the others are `extended`)
  train_digits_config(tmp_path, "vit_digits", arg="family=channelvit,runlocal")
