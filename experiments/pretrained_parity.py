r"""Do converted checkpoints compute the same function? Full-size models, random weights, CPU.

  python experiments/pretrained_parity.py                  # every case
  python experiments/pretrained_parity.py --only=maxvit,llama --out=/tmp/parity.md

Each case builds a framework model at its real size with random weights (nothing is
downloaded), converts it with `big_attn.pretrained`, and compares the logits of one random image
of the model's input size in float32: the maximum absolute difference over the largest absolute
logit. Layer scales (initialised near 0 by timm, which would hide the blocks) and BatchNorm
running statistics are re-drawn so that every converted tensor matters. The table goes to
`experiments/results/pretrained_parity.md` with the command, date, machine and versions.

A case is `(source, name, build_fn)`: `build_fn()` returns the framework model in eval mode;
`CONVERTERS[source]` converts it. Add rows by appending to `CASES`.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from big_attn import pretrained  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

RESULTS = os.path.join(ROOT, "experiments", "results")


def _redraw(model: Any) -> Any:
  """`model` in eval mode with its layer scales and BatchNorm running statistics re-drawn."""
  import torch  # pylint: disable=import-outside-toplevel
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for key, tensor in model.state_dict().items():
      if key.endswith(("gamma", "layer_scale1.scale", "layer_scale2.scale")):
        tensor.uniform_(0.05, 0.2, generator=gen)
      elif key.endswith("running_mean"):
        tensor.normal_(0.0, 0.2, generator=gen)
      elif key.endswith("running_var"):
        tensor.uniform_(0.5, 1.5, generator=gen)
  return model.eval()


def _timm(name: str) -> Callable[[], Any]:
  """A full-size timm model with random weights, layer scales and BatchNorm statistics."""

  def build():
    import timm  # pylint: disable=import-outside-toplevel
    return _redraw(timm.create_model(name, pretrained=False))

  return build


CASES: list[tuple[str, str, Callable[[], Any]]] = [
    ("timm", name, _timm(name)) for name in (
        "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
        "vit_medium_patch16_reg4_gap_256", "vit_base_patch16_siglip_224",
        "deit_tiny_distilled_patch16_224", "deit_small_patch16_224", "convnext_atto",
        "convnext_tiny", "maxvit_tiny_tf_224", "poolformer_s12", "davit_tiny")]


def _transformers(class_name: str, config_name: str, **config: Any) -> Callable[[], Any]:
  """A transformers model of `config` with random weights (seeded) and BatchNorm statistics, in
  eval mode."""

  def build():
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    torch.manual_seed(0)
    model_config = getattr(transformers, config_name)(**config)
    return _redraw(getattr(transformers, class_name)(model_config))

  return build


# Llama-3-style sizes for the decoder LMs: 8 layers, width 512, GQA 8 query / 2 key-value heads.
_LLAMA_3 = dict(vocab_size=32_000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2)
CASES += [
    ("transformers", "ViT-B/16 224", _transformers(
        "ViTForImageClassification", "ViTConfig", num_labels=1000)),
    ("transformers", "DeiT-S/16 224 distilled", _transformers(
        "DeiTForImageClassificationWithTeacher", "DeiTConfig", hidden_size=384,
        num_attention_heads=6, intermediate_size=1536, num_labels=1000)),
    ("transformers", "ConvNeXt-T 224", _transformers(
        "ConvNextForImageClassification", "ConvNextConfig", num_labels=1000)),
    ("transformers", "PoolFormer-S12 224", _transformers(
        "PoolFormerForImageClassification", "PoolFormerConfig", num_labels=1000)),
    ("transformers", "CvT-13 224", _transformers(
        "CvtForImageClassification", "CvtConfig", num_labels=1000)),
    ("transformers", "Llama-3-style, llama3 RoPE scaling", _transformers(
        "LlamaForCausalLM", "LlamaConfig", **_LLAMA_3, max_position_embeddings=131_072,
        rope_parameters=dict(rope_type="llama3", rope_theta=500_000., factor=8.,
                             low_freq_factor=1., high_freq_factor=4.,
                             original_max_position_embeddings=8192))),
    ("transformers", "Qwen2-style, qkv biases, tied embeddings", _transformers(
        "Qwen2ForCausalLM", "Qwen2Config", **_LLAMA_3, tie_word_embeddings=True)),
    ("transformers", "Mistral-style, sliding window 32", _transformers(
        "MistralForCausalLM", "MistralConfig", **_LLAMA_3, sliding_window=32)),
]

CONVERTERS: dict[str, Callable[..., Any]] = {"timm": pretrained.from_timm,
                                              "transformers": pretrained.from_transformers}


def _input(source: str, model: Any) -> np.ndarray:
  """One random image `[1, C, H, W]` of the framework model's input size, or 64 random tokens
  `[1, 64]` for a causal LM."""
  rng = np.random.default_rng(0)
  if source == "timm":
    shape = model.pretrained_cfg["input_size"]
  elif source == "transformers" and hasattr(model.config, "vocab_size"):
    return rng.integers(0, model.config.vocab_size, (1, 64))
  elif source == "transformers":
    shape = (model.config.num_channels, 224, 224)
  else:
    raise ValueError(f"no input rule for source {source!r}")
  return rng.normal(size=(1, *shape)).astype(np.float32)


def run_case(source: str, name: str, build: Callable[[], Any]) -> dict[str, Any]:
  import torch  # pylint: disable=import-outside-toplevel
  model = build()
  images = _input(source, model)
  with torch.no_grad():
    want = model(torch.from_numpy(images))
  want = (want.logits if source == "transformers" else want).numpy()
  start = time.perf_counter()
  module, variables = CONVERTERS[source](model)
  convert_s = time.perf_counter() - start
  if images.ndim == 4:  # [N, C, H, W] -> [N, H, W, C]
    images = images.transpose(0, 2, 3, 1)
  got = np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, images))
  params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(variables["params"]))
  return dict(source=source, name=name, family=type(module).__module__.rsplit(".", 1)[-1],
              params=params, error=float(np.abs(got - want).max() / np.abs(want).max()),
              convert_s=convert_s)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="", help="comma-separated substrings of case names")
  parser.add_argument("--out", default=os.path.join(RESULTS, "pretrained_parity.md"))
  args = parser.parse_args()
  wanted = [s for s in args.only.split(",") if s]
  rows = []
  for source, name, build in CASES:
    if wanted and not any(w in name for w in wanted):
      continue
    try:
      row = run_case(source, name, build)
    except pretrained.ConversionError as e:  # recorded as a row: what is not supported, and why
      row = dict(source=source, name=name, refused=str(e))
      print(f"{source} {name}: refused: {e}", flush=True)
    else:
      print(f"{source} {name}: {row['params']:,} parameters, max relative error "
            f"{row['error']:.1e}, converted in {row['convert_s']:.3f} s", flush=True)
    rows.append(row)
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  lines = [
      "# Converted checkpoints: same logits as the framework model",
      "",
      "`" + shlex.join(["python", "experiments/pretrained_parity.py", *sys.argv[1:]]) + "`",
      f"on {datetime.date.today()}, {platform.machine()} CPU, jax {jax.__version__}, "
      f"torch {torch.__version__}, timm {timm.__version__}, transformers "
      f"{transformers.__version__}. Random weights (full size), one "
      "random image of the model's input size, float32; error = max |big_attn − framework| / "
      "max |framework| over the logits. Conversion time excludes building the framework model.",
      "",
      "| source | model | big_attn family | parameters | max rel. error | convert (s) |",
      "|--------|-------|-----------------|-----------:|---------------:|------------:|"]
  lines += [f"| {r['source']} | {r['name']} | refused: {r['refused']} | | | |" if "refused" in r
            else f"| {r['source']} | {r['name']} | {r['family']} | {r['params']:,} | "
            f"{r['error']:.1e} | {r['convert_s']:.3f} |" for r in rows]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
