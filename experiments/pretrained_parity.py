"""Converted pretrained models against their frameworks: parameters, error, time to convert.

  python experiments/pretrained_parity.py                    # all cases (~2 min on 2 cores)
  python experiments/pretrained_parity.py --only=vit_b16,llama

Each case builds a framework model at a published size with random weights (nothing can be
downloaded here; the conversion does not depend on the values), converts it with
`big_attn.pretrained`, and compares the float32 logits of the same inputs: the max error is
max|big_attn − framework| / max|framework|. Conversion time is `from_transformers` (state dict
to NumPy parameters, copied, and the big_attn model), without building the framework model.
Results (markdown table, device, versions and date on top) go to
experiments/results/pretrained_parity.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from big_attn.models import lm
from big_attn.pretrained import from_transformers
from big_attn.train import step as step_lib

RESULTS = os.path.join(os.path.dirname(__file__), "results", "pretrained_parity.md")


def _images(config, size):
  return np.random.RandomState(0).randn(2, config.num_channels, size, size).astype(np.float32)


def _tokens(config):
  return np.random.RandomState(0).randint(0, config.vocab_size, (2, 64))


LLAMA_3 = dict(vocab_size=32_000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
               num_attention_heads=8, num_key_value_heads=2)
# (name, description, transformers class, config, input builder)
CASES = [
    ("vit_b16", "ViT-B/16 224 (transformers ViTForImageClassification)",
     transformers.ViTForImageClassification, transformers.ViTConfig(num_labels=1000),
     lambda c: _images(c, 224)),
    ("deit_s16", "DeiT-S/16 224 distilled (DeiTForImageClassificationWithTeacher)",
     transformers.DeiTForImageClassificationWithTeacher,
     transformers.DeiTConfig(hidden_size=384, num_attention_heads=6, intermediate_size=1536,
                             num_labels=1000), lambda c: _images(c, 224)),
    ("convnext_t", "ConvNeXt-T 224 (ConvNextForImageClassification)",
     transformers.ConvNextForImageClassification,
     transformers.ConvNextConfig(num_labels=1000), lambda c: _images(c, 224)),
    ("poolformer_s12", "PoolFormer-S12 224 (PoolFormerForImageClassification)",
     transformers.PoolFormerForImageClassification,
     transformers.PoolFormerConfig(num_labels=1000), lambda c: _images(c, 224)),
    ("llama", "Llama-3-style, 8 layers, width 512, GQA 8/2, llama3 RoPE (LlamaForCausalLM)",
     transformers.LlamaForCausalLM, transformers.LlamaConfig(
         **LLAMA_3, max_position_embeddings=131_072, rope_parameters=dict(
             rope_type="llama3", rope_theta=500_000., factor=8., low_freq_factor=1.,
             high_freq_factor=4., original_max_position_embeddings=8192)), _tokens),
    ("qwen2", "Qwen2-style, qkv biases, tied embeddings (Qwen2ForCausalLM)",
     transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**LLAMA_3, tie_word_embeddings=True),
     _tokens),
    ("mistral", "Mistral-style, sliding window 32 (MistralForCausalLM)",
     transformers.MistralForCausalLM, transformers.MistralConfig(**LLAMA_3, sliding_window=32),
     _tokens),
]


def run_case(cls, config, make_inputs):
  torch.manual_seed(0)
  framework = cls(config).eval()
  start = time.perf_counter()
  model, variables = from_transformers(framework)
  seconds = time.perf_counter() - start
  inputs = make_inputs(config)
  with torch.no_grad():
    ref = framework(torch.tensor(inputs)).logits.numpy()
  big_inputs = inputs if isinstance(model, lm.Model) else inputs.transpose(0, 2, 3, 1)
  out = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(big_inputs)))
  error = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
  return step_lib.count_params(variables["params"]), error, seconds


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--only", default="", help="comma-separated case names")
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args(argv)
  only = set(filter(None, args.only.split(",")))
  unknown = only - {c[0] for c in CASES}
  if unknown:
    parser.error(f"unknown cases {sorted(unknown)}; known: {[c[0] for c in CASES]}")
  rows = []
  for name, description, cls, config, make_inputs in CASES:
    if only and name not in only:
      continue
    params, error, seconds = run_case(cls, config, make_inputs)
    rows.append(f"| {description} | {params:,} | {error:.1e} | {1e3 * seconds:.1f} |")
    print(rows[-1], flush=True)
  header = [
      "# Converted pretrained models against their frameworks",
      "",
      f"{datetime.date.today()}, {jax.devices()[0].device_kind} ({os.cpu_count()} cores), "
      f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}."
      f" (load average {os.getloadavg()[0]:.1f}: times are noisy)."
      f" `python experiments/pretrained_parity.py`; random weights at the published sizes, "
      "float32; error = max|big_attn − framework| / max|framework| of the logits.",
      "",
      "| model | parameters | max error | convert (ms) |",
      "|---|---|---|---|",
  ]
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    f.write("\n".join(header + rows) + "\n")
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
