"""big_attn.pretrained.loading: `config.init_from` through main (configs/vit_digits_finetune.py
from a saved transformers ViT onto a sharded mesh, resume winning over it), fitting converted
weights to a model (fresh heads and op parameters, mismatches named), the files it reads, the
convert CLI, and `init_state` from a timm state dict and with BatchNorm running statistics."""
import json
import logging
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from big_attn import checkpoint_io as ckpt_lib
from big_attn import main as main_lib
from big_attn import pretrained
from big_attn.models import vit
from big_attn.pretrained import ConversionError, load_weights, read_checkpoint, save_npz
from big_attn.pretrained import __main__ as cli
from big_attn.pretrained import loading
from big_attn.train import config_lib
from tests.test_train import _config_module

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.xdist_group("pretrained_loading")  # one worker builds `hf_vit_dir` once
TINY = dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=(4, 4))


@pytest.fixture(scope="module")
def hf_vit_dir(tmp_path_factory):
  """A transformers ViT of the tiny digits sizes (7 classes, not the digits' 10), saved."""
  torch.manual_seed(0)
  config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, image_size=16, patch_size=4,
                                  num_channels=1, num_labels=7)
  directory = str(tmp_path_factory.mktemp("hf_vit"))
  transformers.ViTForImageClassification(config).save_pretrained(directory)
  return directory


def flat(params):
  return {"/".join(str(getattr(k, "key", k)) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_finetune_config_loads_the_checkpoint_then_resume_wins(hf_vit_dir, tmp_path, caplog):
  module = _config_module("vit_digits_finetune")
  assert "configs/vit_digits_finetune.py" in module.__doc__
  config = module.get_config(f"path={hf_vit_dir},runlocal")
  assert config.init_from.path == hf_vit_dir and config.model.attention == "sigmoid"
  assert config_lib.base_config().keys() == config.keys()
  main_lib.check_config(config)
  config.model.update(TINY)
  config.input.batch_size = 16
  config.mesh, config.mesh_subset = [("fsdp", 2)], True  # parameters sharded over 2 devices
  config.lr = 0.0  # so the saved parameters are the loaded ones
  config.total_steps, config.log_every, config.ckpt_every = 2, 1, 2
  config.evals = {}
  config = ml_collections.ConfigDict(config.to_dict())
  with caplog.at_level(logging.INFO):
    assert main_lib.train_and_evaluate(config, str(tmp_path))["step"] == 2
  assert "initialised fresh (not taken from the checkpoint): head/bias, head/kernel" in caplog.text
  assert "22 parameters loaded from" in caplog.text
  saved = flat(ckpt_lib.read_state(ckpt_lib.checkpoints_dir(tmp_path))[1]["params"])
  converted = flat(read_checkpoint(config.init_from)[1])
  assert converted["head/kernel"].shape == (16, 7) and saved["head/kernel"].shape == (16, 10)
  for key in set(saved) - {"head/kernel", "head/bias"}:
    np.testing.assert_array_equal(saved[key], converted[key])
  # The workdir's checkpoint wins over init_from: resuming does not read the (moved) file.
  moved = hf_vit_dir + "_moved"
  shutil.move(hf_vit_dir, moved)
  try:
    config.total_steps = 3
    caplog.clear()
    with caplog.at_level(logging.INFO):
      assert main_lib.train_and_evaluate(config, str(tmp_path))["step"] == 3
    assert "init_from" not in caplog.text
  finally:
    shutil.move(moved, hf_vit_dir)


def fresh_params(model):
  return nn.unbox(model.init(jax.random.key(1), jnp.zeros((1, 16, 16, 1)))["params"])


def param_shapes(model):
  return jax.eval_shape(lambda: fresh_params(model))


def test_load_weights_keeps_fresh_heads_and_op_params_and_names_mismatches(tmp_path, caplog):
  source = vit.Model(num_classes=5, pool_type="cls", **TINY)
  path = str(tmp_path / "source.npz")
  save_npz(fresh_params(source), path)
  init_from = dict(path=path, source="big_attn", name=None, model_args={})
  target = vit.Model(num_classes=3, pool_type="cls", attention="gated_attention", **TINY)
  shapes = flat(param_shapes(target))
  with caplog.at_level(logging.INFO):
    loaded = flat(load_weights(init_from, target, param_shapes(target)))
  expected = flat(read_checkpoint(init_from)[1])
  assert set(loaded) == set(shapes)
  op_params = [k for k in shapes if "op_params" in k]
  fresh = op_params + ["head/kernel", "head/bias"]
  assert op_params  # gated_attention's gate
  for key in fresh:  # the model's own (fresh) leaves come back, here its shapes
    assert isinstance(loaded[key], jax.ShapeDtypeStruct) and key in caplog.text
  for key in set(shapes) - set(fresh):
    assert loaded[key].dtype == shapes[key].dtype
    np.testing.assert_array_equal(loaded[key], expected[key])
  # the same classes: the head is loaded too
  same = flat(load_weights(init_from, source, param_shapes(source)))
  np.testing.assert_array_equal(same["head/kernel"], expected["head/kernel"])
  # anything else must fit, or the parameter is named
  with pytest.raises(ConversionError, match=r"MlpBlock/Dense_0/bias: .* has shape \(32,\), "
                     r"the model \(64,\)"):
    wider = vit.Model(num_classes=5, pool_type="cls", **dict(TINY, mlp_dim=64))
    load_weights(init_from, wider, param_shapes(wider))
  with pytest.raises(ConversionError, match=r"key_norm/scale \(8,\) of Model is not in"):
    normed = vit.Model(num_classes=5, pool_type="cls", qk_norm=True, **TINY)
    load_weights(init_from, normed, param_shapes(normed))
  with pytest.raises(ConversionError, match="has parameters Model lacks: cls"):
    gap = vit.Model(num_classes=5, pool_type="gap", **TINY)
    load_weights(init_from, gap, param_shapes(gap))


def test_init_from_config_is_checked():
  with pytest.raises(ValueError, match=r"unknown keys \['file'\]"):
    loading.check_init_from(dict(file="x", source="big_attn"))
  with pytest.raises(ValueError, match="init_from.source must be one of"):
    loading.check_init_from(dict(path="/", source="keras"))
  with pytest.raises(ValueError, match="init_from.path must be an existing"):
    loading.check_init_from(dict(path="/no/such/file.npz", source="big_attn"))
  with pytest.raises(ValueError, match="init_from.name"):
    loading.check_init_from(dict(path="/", source="timm"))


def test_state_dict_files(tmp_path):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  state = {"a.weight": torch.randn(3, 2), "b": torch.arange(4.0)}
  save_file(state, str(tmp_path / "m.safetensors"))
  torch.save({"state_dict": state, "epoch": 3}, str(tmp_path / "m.pth"))
  for name in ("m.safetensors", "m.pth"):
    read = loading.read_state_dict(str(tmp_path / name))
    assert set(read) == set(state) and all(torch.equal(read[k], state[k]) for k in state)
  with pytest.raises(ValueError, match="expected a .safetensors, .pth"):
    loading.read_state_dict(str(tmp_path / "m.ckpt"))


def test_convert_cli_writes_a_checkpoint_init_from_reads(hf_vit_dir, tmp_path, capsys):
  out = str(tmp_path / "converted")
  assert cli.main(["convert", "--source=transformers", f"--in={hf_vit_dir}", f"--out={out}"]) == 0
  with open(os.path.join(out, loading.MODEL_FILE), encoding="utf-8") as f:
    written = json.load(f)
  assert written["model_name"] == "vit"
  assert written["model"] == dict(num_classes=7, width=16, depth=1, mlp_dim=32, num_heads=2,
                                  patch_size=[4, 4], pool_type="cls", norm_eps=1e-12,
                                  approximate_gelu=False)
  model, converted = read_checkpoint(dict(path=hf_vit_dir, source="transformers"))
  assert model is not None
  model, restored = read_checkpoint(dict(path=out, source="big_attn"))
  assert model is None
  expected, got = flat(converted), flat(restored)
  assert set(expected) == set(got)
  assert all(np.array_equal(expected[k], got[k]) for k in expected)
  missing = f"--in={tmp_path}/none"
  assert cli.main(["convert", "--source=transformers", missing, f"--out={out}"]) == 1
  assert "init_from.path must be an existing" in capsys.readouterr().err


def with_new_head(params, num_classes):
  """`params` with a random head of `num_classes` (a model's fresh parameters, without the
  cost of compiling its init)."""
  width = params["head"]["kernel"].shape[0]
  head = {"kernel": np.random.RandomState(0).randn(width, num_classes).astype(np.float32),
          "bias": np.ones(num_classes, np.float32)}
  return dict(params, head=head)


def init_state_logged(init_from, model, variables, caplog):
  tx = optax.sgd(0.1)
  state = jax.tree.map(jnp.asarray, dict(variables, step=0))
  state["opt_state"] = tx.init(state["params"])
  with caplog.at_level(logging.INFO):
    return loading.init_state(init_from, model, tx, state,
                              jax.tree.map(lambda x: x.sharding, state))


def test_init_state_from_a_timm_state_dict_keeps_a_fresh_head(tmp_path, caplog):
  timm = pytest.importorskip("timm")
  model_args = dict(img_size=8, patch_size=4, depth=1, embed_dim=32, num_heads=2, num_classes=3)
  torch.manual_seed(0)
  framework = timm.create_model("vit_tiny_patch16_224", pretrained=False, **model_args).eval()
  path = str(tmp_path / "vit.pth")
  torch.save(framework.state_dict(), path)
  init_from = config_lib.base_config().init_from
  init_from.update(path=path, source="timm", name="vit_tiny_patch16_224", model_args=model_args)
  converted, variables = pretrained.from_timm(framework)
  params = with_new_head(variables["params"], 5)
  loaded = init_state_logged(init_from, converted.clone(num_classes=5), {"params": params}, caplog)
  assert "initialised fresh (not taken from the checkpoint): head/bias, head/kernel" in caplog.text
  got, fresh = flat(loaded["params"]), flat(params)
  expected = flat(read_checkpoint(init_from)[1])
  assert expected["head/kernel"].shape == (32, 3) and got["head/kernel"].shape == (32, 5)
  for key in got:
    np.testing.assert_array_equal(got[key], fresh[key] if key.startswith("head/") else
                                  expected[key])


def test_init_state_takes_batch_norm_statistics(tmp_path, caplog):
  torch.manual_seed(0)
  config = transformers.CvtConfig(embed_dim=[8, 16], num_heads=[1, 2], depth=[1, 2],
                                  cls_token=[False, True], num_labels=3)
  framework = transformers.CvtForImageClassification(config)
  with torch.no_grad():
    for key, tensor in framework.state_dict().items():
      if key.endswith("running_mean"):
        tensor.normal_()
  framework.save_pretrained(str(tmp_path))
  init_from = dict(path=str(tmp_path), source="transformers")
  converted, variables = pretrained.from_transformers(framework)
  fresh = {"params": with_new_head(variables["params"], 5),
           "batch_stats": jax.tree.map(np.zeros_like, variables["batch_stats"])}
  loaded = init_state_logged(init_from, converted.clone(num_classes=5), fresh, caplog)
  got, want = flat(loaded["batch_stats"]), flat(variables["batch_stats"])
  assert set(got) == set(want) and len(got) == 18  # 3 blocks x q/k/v x mean/var
  for key in got:
    np.testing.assert_array_equal(got[key], want[key])
  assert "18 running statistics loaded" in caplog.text
  assert loaded["params"]["head"]["kernel"].shape == (16, 5)
  # a checkpoint without statistics (big_attn's .npz of params) keeps the fresh ones
  save_npz(variables["params"], str(tmp_path / "params.npz"))
  loaded = init_state_logged(dict(path=str(tmp_path / "params.npz"), source="big_attn"),
                             converted, dict(fresh, params=variables["params"]), caplog)
  assert "has no BatchNorm running statistics; they start fresh" in caplog.text
  assert all(np.all(x == 0) for x in jax.tree.leaves(loaded["batch_stats"]))
