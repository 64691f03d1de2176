"""big_attn/models/common.py and the settings every model family shares: sizes resolved from
`variant` and explicit fields when a Model is built, the attention settings' names
(`<role>_attention`, `<role>_attention_args`, `attention_impl`) with the deprecated ones mapped,
and `--config.model.*_args` overrides of every config."""
import dataclasses
import glob
import os
import warnings

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import pytest

from big_attn import main as main_lib
from big_attn import models
from big_attn.models import dit, hvit, maxvit, metaformer
from big_attn.train import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
# A variant of every family with `decode_variant`, and the fields it needs besides the sizes.
VARIANTS = {"vit": ("S/16", dict(num_classes=2)), "deit": ("Ti/16", dict(num_classes=2)),
            "dit": ("S/8", dict(num_classes=2)), "cvt": ("CvT-13", dict(num_classes=2)),
            "convnext": ("T", dict(num_classes=2)), "maxvit": ("T", dict(num_classes=2)),
            "metaformer": ("S12", dict(num_classes=2)), "lm": ("S", dict(vocab_size=16))}


@pytest.mark.parametrize("family", sorted(VARIANTS))
def test_variant_fills_the_sizes_and_fields_override_it(family):
  module = models.get(family)
  variant, needed = VARIANTS[family]
  sizes = module.decode_variant(variant)
  model = module.Model(variant=variant, **needed)
  assert {name: getattr(model, name) for name in sizes} == sizes
  name, value = next((k, v) for k, v in sizes.items() if isinstance(v, (int, tuple)))
  override = value + 1 if isinstance(value, int) else tuple(v + 1 for v in value)
  assert getattr(module.Model(variant=variant, **{name: override}, **needed), name) == override
  # Resolved once: a clone (which passes every field again) is the same model.
  assert model.clone() == model
  with pytest.raises(ValueError, match=f"big_attn.models.{family}.Model needs a variant or "
                     "explicit"):
    module.Model(**needed)
  with pytest.raises(ValueError, match="variant"):
    module.Model(variant="no_such_size", **needed)


def test_derived_defaults_and_lists():
  vit = models.get("vit")
  model = vit.Model(num_classes=2, width=8, depth=1, num_heads=2, patch_size=4)
  assert (model.mlp_dim, model.patch_size) == (32, (4, 4))
  lm = models.get("lm").Model(vocab_size=16, width=256, depth=1, num_heads=4)
  assert (lm.mlp_dim, lm.num_kv_heads, lm.head_dim) == (768, 4, 64)
  convnext = models.get("convnext").Model(num_classes=2, depths=[1, 1], dims=[8, 16])
  assert (convnext.depths, convnext.dims) == ((1, 1), (8, 16))  # a config's lists as tuples


@pytest.mark.parametrize("module, old, new", [
    (hvit, dict(local_op="softmax", global_op_args={"num_heads_hint": 1}),
     dict(local_attention="softmax", global_attention_args={"num_heads_hint": 1})),
    (hvit, dict(global_op="sigmoid", local_op_args={"a": 1}),
     dict(global_attention="sigmoid", local_attention_args={"a": 1})),
    (dit, dict(cross_attention=True, cross_attention_op="sigmoid"),
     dict(cross_attention="sigmoid")),
    (metaformer, dict(mixer_args={"attention": {"op": "sigmoid", "op_args": {"b": 1},
                                                "head_dim": 8}}),
     dict(attention="sigmoid", attention_args={"b": 1}, mixer_args={"attention": {"head_dim": 8}})),
])
def test_deprecated_names_map_onto_the_new_ones(module, old, new):
  sizes = {hvit: dict(variant="davit_t"), dit: dict(variant="S/8"),
           metaformer: dict(variant="S12")}[module]
  with pytest.warns(DeprecationWarning, match="deprecated"):
    legacy = module.Model(num_classes=2, **sizes, **old)
  with warnings.catch_warnings():
    warnings.simplefilter("error", DeprecationWarning)
    current = module.Model(num_classes=2, **sizes, **new)
    assert legacy == current and legacy.clone() == current  # the clone warns no more


def test_deprecated_and_new_names_that_disagree_raise():
  with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="disagree"):
    hvit.Model(num_classes=2, variant="davit_t", local_op="softmax", local_attention="sigmoid")
  with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="disagree"):
    dit.Model(num_classes=2, variant="S/8", cross_attention="softmax",
              cross_attention_op="sigmoid")
  with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="disagree"):
    metaformer.Model(num_classes=2, variant="S12", attention="cog",
                     mixer_args={"attention": {"op": "sigmoid"}})
  # The old DiT default: a cross-attention op without cross-attention is ignored.
  with pytest.warns(DeprecationWarning):
    assert not dit.Model(num_classes=2, variant="S/8", cross_attention_op="softmax").cross_attention


@pytest.mark.parametrize("model", [
    maxvit.Model(num_classes=2, embed_dims=(16,), depths=(1,), head_dim=8, partition_size=2,
                 block_attention="softmax", grid_attention="softmax", attention_impl="bogus"),
    metaformer.Model(num_classes=2, depths=(1,), dims=(8,), mixers="attention",
                     mixer_args=dict(attention=dict(head_dim=8)), attention_impl="bogus"),
    hvit.Model(num_classes=2, family="davit", embed_dims=(8,) * 4, depths=(1,) * 4,
               num_heads=(1,) * 4, patch_size=1, window_size=1, local_attention="softmax",
               global_attention="softmax", attention_impl="bogus"),
    dit.Model(num_classes=2, width=8, depth=1, num_heads=2, patch_size=2,
              attention_impl="bogus"),
], ids=["maxvit", "metaformer", "hvit", "dit"])
def test_attention_impl_reaches_the_op(model):
  with pytest.raises(ValueError, match="implementation.*'bogus'"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))


def test_every_config_declares_its_attention_settings():
  for path in CONFIGS:
    config = config_lib.load_config_file(path)
    module = models.get(config.model_name)
    for field in dataclasses.fields(module.Model):
      if field.name.endswith(("_args", "attention_impl")) and field.default is None and (
          field.name not in getattr(module, "RENAMED", {})):
        assert field.name in config.model, (path, field.name)


@pytest.mark.parametrize("name, key, text, value", [
    ("vit_digits", "attention_args", "{'local_window_size': 2}", {"local_window_size": 2}),
    ("maxvit_digits", "grid_attention_args", "{'scale': 0.5}", {"scale": 0.5}),
    ("hvit_digits", "global_attention", "softmax", "softmax"),
    ("lm_bytes", "attention_impl", "xla", "xla"),
])
def test_attention_settings_are_overridable_on_the_command_line(name, key, text, value):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  argv = ["prog", f"--config={path}", f"--config.model.{key}={text}"]
  loaded = config_lib.load_config_file(path)
  config_lib.check_overrides(loaded, main_lib.config_overrides(argv[1:], loaded))
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  got = flag_values.config.model[key]
  assert (got.to_dict() if isinstance(value, dict) else got) == value


def test_a_declared_setting_is_no_change_on_resume_and_old_config_args_warn():
  old = config_lib.load_config_file(os.path.join(ROOT, "configs", "vit_digits.py"))
  new = config_lib.load_config_file(os.path.join(ROOT, "configs", "vit_digits.py"))
  with old.unlocked():
    del old.model["attention_args"]  # a run saved before the setting was declared
  assert not config_lib.config_changes(old, new)
  with new.unlocked():
    new.model.attention_args = {"x": 1}
  assert config_lib.config_changes(old, new) == [("model.attention_args.x", "<absent>", 1)]
  with pytest.warns(DeprecationWarning, match="'global_op' is deprecated"):
    arg = config_lib.parse_arg("global_op=softmax", global_attention="",
                               renamed=hvit.RENAMED)
  assert arg.global_attention == "softmax"
