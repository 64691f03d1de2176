r"""Explains one test image with the latest checkpoint of a `big_attn.main` image-classifier run.

    python -m big_attn.interpret --workdir=/tmp/vit_digits --image=3 [--out=DIR] [--target=-1] \
        [--flow_max_tokens=16] [--config=configs/vit_digits.py]

The run's config is read from `WORKDIR/config.json` (saved by `big_attn.main`); `--config`
(with the run's `:ARG` and `--config.KEY=VALUE` overrides) replaces it. Writes into `--out` (default
`WORKDIR/interpret/image_N`):
  attention_maps.png  every layer's and head's attention to the patches, over the image;
  relevance.png       attention rollout, attention flow, gradient-weighted rollout, AtMan and
                      (softmax ViTs) the LRP transformer attribution;
  distances.png       mean attention distance of every head against depth;
  token_norms.png     every token's output norm per block (CLS, patch indices, registers);
  summary.json        prediction, the numbers behind the figures and the high-norm tokens.
Each figure's title names the true and the predicted class; heat maps have colour bars.
Models are ViT-like image classifiers (a `patch_size` pair of fields; a class token when
`pool_type` is "cls"/"tok"; `num_registers` register tokens at the end); another run (a language
model, a diffusion model) is refused with a message saying so.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_attn import checkpoint_io, data, models, tasks
from big_attn import main as main_lib
from big_attn.interpret import capture, lrp, plots, relevance
from big_attn.parallel import mesh as mesh_lib
from big_attn.train import config_lib

# --config and --workdir are big_attn.main's flags (imported above), read the same way.
_IMAGE = flags.DEFINE_integer("image", None, "Index of the test image to explain.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default WORKDIR/interpret/image_N).")
_TARGET = flags.DEFINE_integer("target", -1, "Class to explain; -1: the predicted class.")
_FLOW_MAX_TOKENS = flags.DEFINE_integer(
    "flow_max_tokens", 16, "Attention flow (n² max-flows) only for at most this many tokens.")


def _is_image_classifier(model_name: str) -> bool:
  task = getattr(models.get(model_name), "TASK", tasks.CLASSIFICATION)
  return task.batch_spec is tasks.CLASSIFICATION.batch_spec


def check_supported(config: Any) -> None:
  """Raises `ValueError` unless the run's model is an image classifier (its batches are
  `tasks.CLASSIFICATION`'s images and labels), naming the model families that are."""
  if config.model_name not in models.names() or not _is_image_classifier(config.model_name):
    classifiers = [name for name in models.names() if _is_image_classifier(name)]
    raise ValueError(
        f"the run trains model_name={config.model_name!r}, which big_attn.interpret does not "
        "explain: it explains ViT-like image classifiers (Model has a patch_size pair), of "
        f"the image-classification families {', '.join(classifiers)}")


def load_run(config: Any, workdir: str) -> tuple[Any, Any, int, dict[str, Any]]:
  """`(model, params, step, dataset info)` from the newest checkpoint in `workdir/checkpoints`
  (its params only, read by `checkpoint_io.read_state`; nothing in the workdir changes)."""
  input_config = {k: v for k, v in config.input.items() if k != "batch_size"}
  info = data.dataset_info(input_config)
  model_module = models.get(config.model_name)
  task = getattr(model_module, "TASK", tasks.CLASSIFICATION)
  mesh = mesh_lib.make_mesh([("data", 1)])
  model = model_module.Model(**main_lib.model_kwargs(
      config, info, model_module.Model, mesh))
  input_shape, input_dtype = task.example_input(info)
  params = nn.unbox(jax.eval_shape(lambda rng: tasks.init_model_variables(
      model, rng, input_shape, input_dtype)["params"], jax.random.key(0)))
  step, state = checkpoint_io.read_state(checkpoint_io.checkpoints_dir(workdir),
                                         {"params": params})
  return model, state["params"], step, info


def load_test_image(config: Any, index: int, num_test: int) -> dict[str, np.ndarray]:
  """Example `index` of the test split, preprocessed as the evaluators see it."""
  if not 0 <= index < num_test:
    raise ValueError(f"--image must be in [0, {num_test}) (the test split), got {index}")
  input_config = {k: v for k, v in config.input.items() if k != "batch_size"}
  batch = next(iter(data.get_dataset(input_config, split="test", batch_size=index + 1, seed=0,
                                     train=False)))
  return {k: np.asarray(v[index]) for k, v in batch.items()}


def token_layout(model: Any, image_shape: tuple[int, ...]) -> dict[str, Any]:
  """Patch grid, patch size, class-token prefix and total token count of a ViT-like model."""
  patch = getattr(model, "patch_size", None)
  if not (isinstance(patch, tuple) and len(patch) == 2):
    raise ValueError(f"{type(model).__module__}.Model has no patch grid (no patch_size pair, "
                     f"got {patch!r}): big_attn.interpret explains ViT-like image classifiers")
  ph, pw = patch
  grid = (image_shape[0] // ph, image_shape[1] // pw)
  num_prefix = int(getattr(model, "pool_type", "gap") in ("cls", "tok"))
  num_registers = getattr(model, "num_registers", 0)
  num_tokens = num_prefix + grid[0] * grid[1] + num_registers
  return dict(grid=grid, patch_size=(ph, pw), num_prefix=num_prefix, num_tokens=num_tokens,
              num_registers=num_registers, query=0 if num_prefix else None)


def explain(config: Any, workdir: str, image_index: int, out_dir: str | None = None, *,
            target: int = -1, flow_max_tokens: int = 16) -> dict[str, Any]:
  """Writes the figures and `summary.json` of the module docstring; returns the summary.

  `config` None reads the run's own config from the workdir.
  """
  if config is None:
    config = config_lib.load_config(workdir)
  check_supported(config)
  model, params, step, info = load_run(config, workdir)
  example = load_test_image(config, image_index, info["num_examples"]["test"])
  out_dir = out_dir or os.path.join(workdir, "interpret", f"image_{image_index}")
  layout = token_layout(model, info["image_shape"])
  grid, num_prefix = layout["grid"], layout["num_prefix"]
  variables = {"params": params}
  images = jnp.asarray(example["image"][None])

  logits = np.asarray(jax.jit(model.apply)(variables, images))[0]
  target = int(np.argmax(logits)) if target < 0 else target
  if target >= logits.size:
    raise ValueError(f"--target must be -1 or a class in [0, {logits.size}), got {target}")
  maps, grads = capture.attention_gradients(
      model, variables, lambda out: out[:, target].sum(), images)
  layers = [p for p, m in maps.items() if m.shape[-2:] == (layout["num_tokens"],) * 2]
  self_maps = [maps[p] for p in layers]
  as_grid = lambda rel: rel[0].reshape(grid)  # pylint: disable=unnecessary-lambda-assignment
  patch_relevance = lambda r: relevance.token_relevance(  # pylint: disable=g-long-lambda
      r, query=layout["query"], num_prefix=num_prefix, num_patches=grid[0] * grid[1])

  heatmaps = {"rollout": as_grid(patch_relevance(relevance.attention_rollout(self_maps))),
              "gradient rollout": as_grid(patch_relevance(relevance.gradient_rollout(
                  self_maps, [grads[p] for p in layers])))}
  if lrp.supports(model):
    heatmaps["LRP"] = as_grid(lrp.transformer_attribution(model, variables, images, target))
  if layout["num_tokens"] <= flow_max_tokens:
    outputs = ([layout["query"]] if layout["query"] is not None
               else range(num_prefix, num_prefix + grid[0] * grid[1]))
    flow = relevance.attention_flow(self_maps, outputs=outputs)
    heatmaps["flow"] = as_grid(flow.mean(1)[:, num_prefix:num_prefix + grid[0] * grid[1]])
  tokens = range(num_prefix, num_prefix + grid[0] * grid[1])
  heatmaps["AtMan"] = as_grid(relevance.atman(
      model, variables, lambda out: -jax.nn.log_softmax(out)[:, target], images,
      num_tokens=layout["num_tokens"], tokens=tokens))
  distances = {p: relevance.attention_distance(
      maps[p], grid, patch_size=layout["patch_size"], num_prefix=num_prefix) for p in layers}
  norms = relevance.token_norms(capture.block_outputs(model, variables, images))

  high_norm = {p: relevance.high_norm_tokens(n[0]) for p, n in norms.items()}
  prediction = int(np.argmax(logits))
  title = (f"{config.model_name}, step {step}, test image {image_index}: label "
           f"{int(example['label'])}, predicted {prediction} "
           f"(p={float(jax.nn.softmax(logits)[prediction]):.2f})")
  plots.plot_attention_maps(example["image"], {p.split("/")[-2]: maps[p][0] for p in layers},
                            grid, os.path.join(out_dir, "attention_maps.png"),
                            num_prefix=num_prefix, query=layout["query"], title=title)
  plots.plot_heatmaps(example["image"], heatmaps, os.path.join(out_dir, "relevance.png"),
                      title=f"{title}\nrelevance for class {target}")
  plots.plot_distances(list(distances.values()), os.path.join(out_dir, "distances.png"),
                       title=title)
  plots.plot_token_norms(
      norms, os.path.join(out_dir, "token_norms.png"), high_norm=high_norm, title=title,
      labels=plots.token_labels(layout["num_tokens"], num_prefix=num_prefix,
                                num_registers=layout["num_registers"]))

  summary = dict(
      workdir=os.path.abspath(workdir), out=os.path.abspath(out_dir), step=int(step),
      image=image_index,
      label=int(example["label"]), prediction=prediction, target=target,
      logits=logits.tolist(), layers=layers, grid=list(grid), num_prefix=num_prefix,
      attention_distance={p: d.tolist() for p, d in distances.items()},
      relevance={k: np.asarray(v).tolist() for k, v in heatmaps.items()},
      token_norms={p: dict(mean=float(n.mean()), median=float(np.median(n)),
                           max=float(n.max()),
                           high_norm_tokens=np.flatnonzero(high_norm[p]).tolist())
                   for p, n in norms.items()})
  with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  return summary


def main(argv):
  if len(argv) > 1:
    main_lib.exit_with_error("big_attn.interpret", f"unexpected arguments {argv[1:]}")
  config, workdir = main_lib.config_and_workdir()
  try:
    summary = explain(config, workdir, _IMAGE.value, _OUT.value, target=_TARGET.value,
                      flow_max_tokens=_FLOW_MAX_TOKENS.value)
  except (ValueError, FileNotFoundError) as e:
    main_lib.exit_with_error("big_attn.interpret", e)
  print(f"step {summary['step']}: image {summary['image']} label {summary['label']} "
        f"predicted {summary['prediction']}; figures in {summary['out']}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "image"])
  app.run(main, flags_parser=functools.partial(main_lib.parse_flags,
                                               program="big_attn.interpret"))
