r"""Converts a timm or transformers checkpoint file to a big_attn orbax checkpoint.

    python -m big_attn.pretrained convert --source=transformers --in=/tmp/hf_vit \
        --out=/tmp/vit_converted
    python -m big_attn.pretrained convert --source=timm --name=vit_tiny_patch16_224 \
        --in=vit_tiny.safetensors --out=/tmp/vit_tiny [--model_args='{"num_classes": 10}']

`--in` is read as `config.init_from.path` with that `source` (`big_attn.pretrained.loading`).
`--out` receives the checkpoint (step 0, state `{"step", "params"}`; fine-tune from it with
`config.init_from = dict(path=OUT, source="big_attn")`) and `model.json`: the big_attn
`model_name` and the `model` fields that compute the same function (the `config.model` to use).
"""
from __future__ import annotations

import argparse
import json
import sys

from big_attn.pretrained import loading


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m big_attn.pretrained",
                                   description=__doc__.split("\n", 1)[0])
  commands = parser.add_subparsers(dest="command", required=True)
  convert = commands.add_parser("convert", help="checkpoint file -> big_attn orbax checkpoint")
  convert.add_argument("--source", required=True, choices=("transformers", "timm"))
  convert.add_argument("--in", dest="path", required=True,
                       help="transformers directory or weights file; timm state dict file")
  convert.add_argument("--out", required=True, help="output directory (created)")
  convert.add_argument("--name", default=None, help="timm model name")
  convert.add_argument("--model_args", default="{}",
                       help="JSON keyword arguments of timm.create_model")
  args = parser.parse_args(argv)
  try:
    model_args = json.loads(args.model_args)
  except json.JSONDecodeError as e:
    parser.error(f"--model_args is not JSON: {e}")
  init_from = dict(path=args.path, source=args.source, name=args.name, model_args=model_args)
  try:
    model_name = loading.convert(init_from, args.out)
  except ValueError as e:  # ConversionError included: a message naming the field
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.out} (model_name={model_name!r}, fields in {args.out}/"
        f"{loading.MODEL_FILE})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
