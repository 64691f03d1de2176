r"""Trains a model from a config; a run started again on the same workdir resumes.

    python -m big_attn.main --list          # configs with their options, models, attention ops
    python -m big_attn.main --config=configs/vit_digits.py --workdir=/tmp/vit_digits
    python -m big_attn.main --config=configs/vit_digits.py:runlocal --workdir=/tmp/smoke
    python -m big_attn.main --config=configs/vit_i1k.py:variant=S/16 --workdir=DIR \
        --config.lr=3e-3 --config.mesh="[('fsdp', -1)]"
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m big_attn.main \
        --config=configs/vit_2b.py --workdir=/tmp/vit_2b --config.dry_run=True

`--config=configs/NAME.py:ARG` passes ARG (`option=value,...`; `runlocal` a smoke run of a few
steps, `steps=N` the run's length) to the config's `get_config`; `--config.KEY=VALUE` then
overrides any key, read as the type of its value (lists and tuples as Python literals).
The run reads top to bottom: mesh, input, model, sharding, update step, checkpoint, evaluators,
loop. The workdir receives the run's config (`config.json`, read back by `python -m
big_attn.interpret`), `metrics.jsonl`, TensorBoard events (`tensorboard/`) and orbax checkpoints
(`checkpoints/`).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import signal
import sys
import threading
import time
from typing import Any, NoReturn

from absl import app, flags, logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import config_flags

from big_attn import catalog, compat, data, evaluators, models, pretrained
from big_attn.parallel import mesh as mesh_lib
from big_attn import checkpoint_io as ckpt_lib
from big_attn.train import config_lib
from big_attn.train import metrics as metrics_lib
from big_attn.train import optim
from big_attn.train import prefetch as prefetch_lib
from big_attn.train import regularizers
from big_attn.train import step as step_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training configuration configs/NAME.py[:ARG] (see --list); "
    "--config.KEY=VALUE overrides a key.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_LIST = flags.DEFINE_bool(
    "list", False, "List the configs with their options, the model families and the attention "
    "ops, then exit.")


class _LiteralOverride(flags.ArgumentParser):
  """ml_collections' parser of `--config.KEY=VALUE` for keys whose value is a list or None, for
  which it has none: `config_lib.read_override` (a Python literal; the string for None)."""

  def __init__(self, example: Any):
    self._example = example

  def parse(self, argument):
    if not isinstance(argument, str):  # the flag's default: the key's current value
      return argument
    try:
      return config_lib.read_override("KEY", argument, self._example)
    except ValueError:  # absl names the flag; only a list can be refused
      raise ValueError(f"expected a Python list such as \"[('fsdp', -1)]\", got {argument!r}"
                       ) from None

  def flag_type(self):
    return "config_literal"


for _example in ([], None):
  config_flags.register_flag_parser_for_type(type(_example), _LiteralOverride(_example))

_OVERRIDE = re.compile(r"-{1,2}(no)?config\.([^=]+)(?:=(.*))?", re.S)
_HELP_FLAGS = ("-h", "-help", "--help", "-?", "--helpshort", "-helpshort")

_LOG_LEVEL = flags.DEFINE_enum(
    "log_level", "warning", metrics_lib.LOG_LEVELS, "Console lines of other libraries (orbax, "
    "grain, absl, jax) from this level up; big_attn's own progress lines always show. 'info' "
    "shows everything.")

_MODEL_DTYPE_KEYS = ("dtype", "param_dtype")
_EVAL_RESERVED = ("type", "every")


_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0's coordinator, for a manual multi-host "
    "launch (or JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes of a manual launch (or JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, num_processes) (or JAX_PROCESS_ID).")


def _tpu_pod_detected() -> bool:
  return any(cluster.is_env_present() for cluster in compat.tpu_cluster_types())


def distributed_args(env: Any, *, coordinator_address: str | None = None,
                     num_processes: int | None = None, process_id: int | None = None,
                     tpu_pod: bool = False) -> dict[str, Any] | None:
  """The arguments of `jax.distributed.initialize` for this launch, or None for one process.

  A manual launch gives the coordinator, process count and id (flags, else JAX_COORDINATOR_
  ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); count and id may come from Open MPI
  (OMPI_COMM_WORLD_SIZE/RANK) or an srun step (SLURM_NTASKS/SLURM_PROCID). Otherwise the
  cluster is detected: an srun step of several tasks, Open MPI with its coordinator URI (Open MPI
  4), a TPU pod. A SLURM allocation without an srun step runs one process. Raises `ValueError`
  naming what is missing.
  """
  in_srun = "SLURM_STEP_ID" in env and "SLURM_PROCID" in env
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None:
    count = (env.get("JAX_NUM_PROCESSES") or env.get("OMPI_COMM_WORLD_SIZE")
             or (env.get("SLURM_NTASKS") if in_srun else None))
    num_processes = int(count) if count else None
  if process_id is None:
    index = (env.get("JAX_PROCESS_ID") or env.get("OMPI_COMM_WORLD_RANK")
             or (env.get("SLURM_PROCID") if in_srun else None))
    process_id = int(index) if index else None
  if coordinator_address:
    missing = [name for name, value in (("--num_processes", num_processes),
                                        ("--process_id", process_id)) if value is None]
    if missing:
      raise ValueError(f"--coordinator_address={coordinator_address} is given but not "
                       f"{' and '.join(missing)} (nor their JAX_* environment variables, Open MPI's "
                       "or an srun step's)")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                       f"{num_processes})")
    return dict(coordinator_address=coordinator_address, num_processes=num_processes,
                process_id=process_id)
  if in_srun and int(env.get("SLURM_NTASKS", "1")) > 1:
    return {}  # JAX's SLURM detection: coordinator on the step's first node
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    if not env.get("OMPI_MCA_orte_hnp_uri"):
      raise ValueError("Open MPI started several processes but sets no OMPI_MCA_orte_hnp_uri "
                       "(Open MPI 5): pass --coordinator_address=HOST:PORT (a free port on rank "
                       "0's host); the process count and id are taken from Open MPI")
    return {}
  if tpu_pod:
    return {}
  return None


def initialize_distributed() -> None:
  """`jax.distributed.initialize` for a multi-process launch; logs a single-process one."""
  args = distributed_args(os.environ, coordinator_address=_COORDINATOR.value,
                          num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                          tpu_pod=_tpu_pod_detected())
  if args is None:
    logging.info("one process (no --coordinator_address, srun step, Open MPI or TPU pod found)")
    return
  jax.distributed.initialize(**args)
  logging.info("process %d of %d", jax.process_index(), jax.process_count())


class RunRefused(ValueError):
  """The workdir holds a run that this config may not continue; nothing was touched."""


class StopRequest:
  """SIGTERM or SIGINT at any time (start-up, restore, compile, loop) asks the run to stop.

  Installed first thing in `train_and_evaluate`; the loop stops at a step boundary and saves a
  checkpoint. A second SIGINT interrupts at once (KeyboardInterrupt). With several processes
  the request is shared: at every `every`-th step (the log steps, where the loop syncs with the
  host anyway) the processes all-gather their flags, and all stop at that step if any was asked.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = {}
    if threading.current_thread() is not threading.main_thread():
      return
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self._event.is_set():
      raise KeyboardInterrupt
    logging.warning("%s received: stopping at the next step and saving a checkpoint",
                    signal.Signals(signum).name)
    self._event.set()

  def agreed(self, step: int, every: int) -> bool:
    """Whether the run stops before `step + 1`: this process was asked (one process), or any
    process was (several; decided at steps that are multiples of `every` only)."""
    if jax.process_count() == 1:
      return self._event.is_set()
    if step % every:
      return False
    flags_ = multihost_utils.process_allgather(np.asarray(self._event.is_set()))
    return bool(np.any(flags_))

  def restore_handlers(self) -> None:
    for sig, handler in self._previous.items():
      # None: a handler installed outside Python (JAX's preemption notifier), which cannot be
      # put back; the default disposition then.
      signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    self._previous = {}


def prepare_workdir(config: Any, workdir: str) -> None:
  """Checks that `config` may run in `workdir`, then records it there as `config.json`.

  A workdir whose checkpoints come from a config that differs outside
  `config_lib.RESUMABLE_KEYS` is refused (`RunRefused`, nothing touched) unless
  `config.resume_policy` is "accept_changes" (resume; the previous config is kept as
  `config.<time>.json`) or "restart" (the previous run's checkpoints, checksums, metrics and
  TensorBoard events are moved to `*.previous-<time>` and training starts at step 0).
  """
  if config.resume_policy not in config_lib.RESUME_POLICIES:
    raise ValueError(f"config.resume_policy must be one of {config_lib.RESUME_POLICIES}, got "
                     f"{config.resume_policy!r}")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise RunRefused(f"--workdir={workdir} exists and is not a directory")
  checkpoints = os.path.join(workdir, "checkpoints")
  has_run = os.path.isdir(checkpoints) and any(
      name.isdigit() or ".corrupt-" in name for name in os.listdir(checkpoints))
  if jax.process_count() > 1:  # every process has looked before any of them changes a thing
    multihost_utils.sync_global_devices("big_attn workdir inspected")
  stamp = time.strftime("%Y%m%d-%H%M%S")
  saved = os.path.join(workdir, config_lib.CONFIG_FILE)
  if has_run and config.resume_policy == "restart":
    if jax.process_index() == 0:
      for name in ("checkpoints", "checkpoints-sha256", "metrics.jsonl", "tensorboard",
                   config_lib.CONFIG_FILE):
        path = os.path.join(workdir, name)
        if os.path.exists(path):
          stem, ext = os.path.splitext(path)
          os.rename(path, f"{stem}.previous-{stamp}{ext}")
    multihost_utils.sync_global_devices("big_attn workdir restarted")
    logging.warning("resume_policy=restart: the previous run in %s was moved to "
                    "*.previous-%s; starting at step 0", workdir, stamp)
  elif has_run and os.path.exists(saved):
    changes = config_lib.config_changes(config_lib.load_config(workdir), config)
    if changes and config.resume_policy == "resume":
      lines = "\n".join(f"  {key}: {old!r} -> {new!r}" for key, old, new in changes)
      raise RunRefused(
          f"--workdir={workdir} holds checkpoints of a run whose config differs from this one "
          f"in keys that change the train state or its meaning:\n{lines}\nNothing was changed. "
          "To continue that run, pass its config again (keys that may change on a restart: "
          f"{', '.join(config_lib.RESUMABLE_KEYS)}). To start a new run, use another --workdir, "
          "or --config.resume_policy=restart to keep the old run aside and start at step 0; "
          "--config.resume_policy=accept_changes resumes the checkpoints with this config.")
    if jax.process_count() > 1:  # every process has read the saved config before it moves
      multihost_utils.sync_global_devices("big_attn config compared")
    if changes and jax.process_index() == 0:
      os.replace(saved, os.path.join(workdir, f"config.{stamp}.json"))
      logging.warning("resume_policy=accept_changes: resuming with changed %s (the previous "
                      "config is config.%s.json)", [k for k, _, _ in changes], stamp)
  if jax.process_index() == 0:
    config_lib.save_config(config, workdir)


def check_config(config: Any) -> None:
  """Raises `ValueError` for keys that no part of the run reads (typos) and bad values."""
  known = set(config_lib.base_config().keys())
  unknown = set(config.keys()) - known
  if unknown:
    raise ValueError(f"config has unknown keys {sorted(unknown)}; known keys: {sorted(known)}")
  for key in ("total_steps", "log_every", "ckpt_every", "grad_accum_steps", "input.batch_size"):
    value = config_lib.lookup(config, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"config.{key} must be a positive int, got {value!r}")
  for name, cfg in config.evals.items():
    if "type" not in cfg or "every" not in cfg:
      raise ValueError(f"config.evals.{name} needs `type` and `every`, got {sorted(cfg.keys())}")


def dataset_info(config: Any, input_config: dict[str, Any]) -> dict[str, Any]:
  """`data.dataset_info`; a dry run without the data set falls back to the config.

  The fallback (so that a large config compiles before its data is prepared) takes
  `num_classes` from `config.model.num_classes` and images of `input.image_size` with
  `input.channels` (default 3) channels.
  """
  try:
    return data.dataset_info(input_config)
  except (ImportError, FileNotFoundError) as e:
    num_classes = config.model.get("num_classes")
    if not config.dry_run or not num_classes:
      raise
    logging.warning("dry run without the data set (%s); num_classes=%d from config.model", e,
                    num_classes)
    size, channels = config.input.image_size, config.input.get("channels") or 3
    return dict(num_classes=num_classes, image_shape=(size, size, channels))


def model_kwargs(config: Any, info: dict[str, Any], model_cls: Any, mesh: Any
                  ) -> dict[str, Any]:
  """`config.model` with the output size from the data (`num_classes` or `vocab_size`), dtype
  names as dtypes, and the mesh for models that take one (sequence parallelism)."""
  kwargs = config.model.to_dict()
  for key in ("num_classes", "vocab_size"):
    if key not in info:
      continue
    kwargs.setdefault(key, info[key])
    if kwargs[key] != info[key]:
      raise ValueError(f"config.model.{key}={kwargs[key]} but the data set has {info[key]}")
  if "mesh" in {f.name for f in dataclasses.fields(model_cls)}:
    kwargs["mesh"] = mesh
  for key in _MODEL_DTYPE_KEYS:
    if isinstance(kwargs.get(key), str):
      kwargs[key] = jnp.dtype(kwargs[key])
  return kwargs


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) training; returns `{"step": last step, "preempted": bool}`.

  With `config.dry_run` it only compiles one step and returns `{"parameters", "memory",
  "flops"}` instead.
  """
  stop = StopRequest()
  try:
    return _train_and_evaluate(config, workdir, stop)
  finally:
    stop.restore_handlers()


def _train_and_evaluate(config: Any, workdir: str, stop: StopRequest) -> dict[str, Any]:
  check_config(config)
  if not config.dry_run:
    prepare_workdir(config, workdir)
  with config_lib.naming("config.sharding_rules"):
    rules = mesh_lib.check_rules(config.sharding_rules)
  rng = jax.random.key(config.seed)
  init_rng, train_rng = jax.random.split(rng)

  # ---------------------------------------------------------------------------------------- Mesh
  with config_lib.naming("config.mesh"):
    mesh = mesh_lib.make_mesh(config.mesh, allow_subset=config.mesh_subset)
  data_sharding = mesh_lib.data_sharding(mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  logging.info("mesh: %s over %d devices (%d processes)", dict(mesh.shape), mesh.size,
               jax.process_count())

  # --------------------------------------------------------------------------------------- Input
  batch_size = config.input.batch_size
  split_ways = mesh_lib.batch_divisor(mesh, rules) * config.grad_accum_steps
  if batch_size % split_ways:
    raise ValueError(f"config.input.batch_size {batch_size} must be a multiple of "
                     f"{split_ways} (the ways the mesh splits a batch x grad_accum_steps)")
  input_config = {k: v for k, v in config.input.items() if k != "batch_size"}
  with config_lib.naming("config.input"):
    info = dataset_info(config, input_config)
  with config_lib.naming("config.model_name"):
    model_module = models.get(config.model_name)
  task = getattr(model_module, "TASK", step_lib.CLASSIFICATION)
  input_shape, input_dtype = task.example_input(info)
  batch_spec = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=data_sharding)
                for k, (shape, dtype) in task.batch_spec(info, batch_size).items()}
  process_rows = mesh_lib.process_rows(data_sharding, batch_size)

  # --------------------------------------------------------------------------------------- Model
  try:
    model = model_module.Model(**model_kwargs(config, info, model_module.Model, mesh))
  except TypeError as e:
    raise config_lib.ConfigError(
        f"config.model does not fit {config.model_name}.Model: {e}") from None
  except ValueError as e:  # sizes: an unknown variant, a size neither it nor a field gives
    raise config_lib.ConfigError(f"config.model: {e}") from None
  with config_lib.naming("config.optax"):
    schedule = optim.make_schedule(config.lr, config.schedule, config.total_steps)
    tx = optim.make_optimizer(config.optax_name, config.optax.to_dict(), schedule,
                              config.grad_clip_norm, head_weight_decay=config.wd_head)

  # ------------------------------------------------------------------------------------ Sharding
  with config_lib.naming("config.model"):  # the model's own checks run when it is traced
    boxed_state = step_lib.abstract_state(model, tx, input_shape, input_dtype)
  state_shardings = step_lib.state_shardings(boxed_state, mesh, rules)
  abstract_state = step_lib.with_shardings(boxed_state, state_shardings)
  num_params = step_lib.count_params(boxed_state["params"])
  logging.info("parameters: %d", num_params)

  # --------------------------------------------------------------------------------- Update step
  # `task.constants` (a distillation teacher's parameters) are loaded once, replicated, and
  # passed to every step as an argument.
  # An attention-transfer teacher's variables travel the same way, beside them.
  task_constants = (None if task.constants is None
                    else jax.device_put(task.constants(model, info), replicated))

  diversification = config.loss.attention_diversification
  transfer = config.loss.attention_transfer
  for key, value in (("attention_diversification", diversification),
                     ("attention_transfer", transfer)):
    if value and (getattr(model, "scan_layers", False)
                  or getattr(model, "remat_policy", "none") != "none"):
      raise config_lib.ConfigError(
          f"config.loss.{key} reads the attention maps of every layer: it needs "
          "config.model.scan_layers=False and remat_policy='none'")
  teacher, teacher_variables = None, None
  transfer_weight = (1.0 if config.loss.attention_transfer_weight is None
                     else config.loss.attention_transfer_weight)
  if transfer:
    with config_lib.naming("config.loss.attention_transfer"):
      regularizers.check_attention_transfer(transfer, transfer_weight,
                                            config.loss.attention_transfer_layers)
    if config.loss.attention_transfer_teacher is None:
      raise config_lib.ConfigError("config.loss.attention_transfer needs "
                                   "config.loss.attention_transfer_teacher (a teacher dict)")
    with config_lib.naming("config.loss.attention_transfer_teacher"):
      teacher, teacher_variables = regularizers.restore_attention_teacher(
          config.loss.attention_transfer_teacher.to_dict(), info["num_classes"],
          tuple(info["image_shape"]))
    teacher_variables = jax.device_put(teacher_variables, replicated)
  constants = (task_constants, teacher_variables)

  def task_loss(c, loss):
    if loss is None:
      return loss
    task_c, teacher_c = c
    if task.constants is not None:
      loss = functools.partial(loss, constants=task_c)
    if transfer:
      loss = regularizers.with_attention_transfer(
          loss, teacher, teacher_c, mode=transfer, weight=transfer_weight,
          layers=config.loss.attention_transfer_layers)
    if diversification:
      loss = regularizers.with_attention_diversification(
          loss, diversification, threshold=(
              regularizers.THRESHOLD if config.loss.attention_diversification_threshold is None
              else config.loss.attention_diversification_threshold))
    if config.loss.spa_selection:
      loss = regularizers.with_spa_selection(loss, config.loss.spa_selection)
    if config.loss.token_reduction_consistency:
      loss = regularizers.with_token_reduction_consistency(
          loss, config.loss.token_reduction_consistency,
          r=config.loss.token_reduction_consistency_r)
    return loss

  def update(state, batch, rng, c):
    return step_lib.make_train_step(
        model, tx, schedule, grad_accum_steps=config.grad_accum_steps,
        micro_sharding=data_sharding, loss_fn=task_loss(c, task.loss),
        loss_with_stats_fn=task_loss(c, task.loss_with_stats))(state, batch, rng)

  train_step = jax.jit(
      update, in_shardings=(state_shardings, data_sharding, replicated, replicated),
      out_shardings=(state_shardings, replicated), donate_argnums=(0,))

  rng_spec = jax.ShapeDtypeStruct(train_rng.shape, train_rng.dtype, sharding=replicated)

  def lower_and_count():
    lowered = train_step.lower(abstract_state, batch_spec, rng_spec, constants)
    return lowered, step_flops(model, tx, schedule, config, input_shape, batch_spec,
                               input_dtype=input_dtype, loss_fn=task_loss(constants, task.loss),
                               loss_with_stats_fn=task_loss(constants, task.loss_with_stats),
                               lowered=lowered)

  if config.dry_run:
    lowered, flops = lower_and_count()
    return report_compiled(lowered.compile(), num_params, mesh.size, flops)

  # ---------------------------------------------------------------------------------- Evaluators
  evals = {}
  for name, cfg in config.evals.items():
    kwargs = {k: v for k, v in cfg.items() if k not in _EVAL_RESERVED}
    kwargs.setdefault("input_config", input_config)
    kwargs.setdefault("batch_size", batch_size)
    with config_lib.naming(f"config.evals.{name}"):
      evals[name] = (evaluators.get(cfg.type)(model, mesh=mesh, rules=rules, **kwargs),
                     cfg.every)

  # ---------------------------------------------------------------------------------- Checkpoint
  checkpointer = ckpt_lib.Checkpointer(
      ckpt_lib.checkpoints_dir(workdir), every=config.ckpt_every,
      max_to_keep=config.max_to_keep)
  restored = checkpointer.restore_latest(abstract_state)
  if restored is None:
    state = jax.jit(step_lib.make_init_fn(model, tx, input_shape, input_dtype),
                    out_shardings=state_shardings)(init_rng)
    with config_lib.naming("config.init_from"):
      state = pretrained.init_state(config.init_from, model, tx, state, state_shardings)
    first_step = 0
  else:
    first_step, state = restored
  if first_step >= config.total_steps:
    checkpointer.close()
    if jax.process_index() == 0:
      logging.info("the run in %s has finished (step %d of %d):\n%s", workdir, first_step,
                   config.total_steps, metrics_lib.summary(workdir))
    return {"step": first_step, "preempted": False}
  logging.info("starting at step %d of %d", first_step, config.total_steps)

  # ------------------------------------------------------------------- Compile (before the loop)
  logging.info("compiling the train step...")
  start = time.perf_counter()
  lowered, flops = lower_and_count()
  compiled_step = lowered.compile()
  logging.info("compiled the train step in %.1f s", time.perf_counter() - start)
  train_rng = jax.jit(lambda key: key, in_shardings=replicated, out_shardings=replicated)(
      train_rng)  # as the compiled step takes it (a global array with several processes)

  if evals:  # the evaluators' steps, compiled before the loop too
    start = time.perf_counter()
    for evaluator, _ in evals.values():
      evaluator.compile(abstract_state)
    logging.info("compiled %d evaluator(s) in %.1f s", len(evals), time.perf_counter() - start)

  # ---------------------------------------------------------------------------------------- Loop
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0,
                                    resume_step=first_step)
  earlier = [r["train/elapsed_time"] for r in metrics_lib.read_records(workdir)
             if "train/elapsed_time" in r] if writer.enabled else []
  progress = metrics_lib.Progress(
      first_step, config.total_steps, batch_size,
      tokens_per_example=task.tokens_per_example and task.tokens_per_example(info),
      flops_per_step=flops, num_devices=mesh.size,
      peak_flops_per_device=metrics_lib.peak_flops_per_device(list(mesh.devices.flat)),
      elapsed=earlier[-1] if earlier else 0.0)
  # The data order depends on the seed and the global batch only: step s reads global batch s.
  # Batches are read and placed on the devices ahead of the step (`Prefetch`).
  batches = prefetch_lib.Prefetch(
      data.get_dataset(input_config, split="train", batch_size=batch_size, seed=config.seed,
                       train=True, rows=process_rows, start_batch=first_step),
      lambda batch: mesh_lib.shard_batch({k: batch[k] for k in batch_spec}, data_sharding,
                                         batch_size),
      count=config.total_steps - first_step)

  def report(step, metrics):
    """Fetches a step's metrics (copied to the host since the step), stops on NaN, logs them."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    metrics_lib.check_finite(step, values)
    if step % config.log_every == 0 or step == config.total_steps:
      values.update(progress.measure(step))
      writer.write(step, values)
      progress.log(step, values)

  step, preempted, pending = first_step, False, None
  try:
    while step < config.total_steps:
      if stop.agreed(step, config.log_every):
        preempted = True
        break
      state, metrics = compiled_step(state, next(batches), train_rng, constants)
      step += 1
      # The previous log step's metrics are read once this step is queued: no host sync per step.
      if pending is not None:
        report(*pending)
        pending = None
      last = step == config.total_steps
      due_evals = [name for name, (_, every) in evals.items() if last or (
          step % every == 0 and config.total_steps - step >= every)]
      due_checkpoint = step % config.ckpt_every == 0 or last
      if step % config.log_every == 0 or due_checkpoint:
        for value in metrics.values():
          value.copy_to_host_async()
        pending = (step, metrics)
      if pending is not None and (due_evals or due_checkpoint):
        report(*pending)  # no NaN checkpoint; eval metrics join the step's line
        pending = None
      with progress.paused():
        for name in due_evals:
          results = {f"{name}/{key}": value for key, value in evals[name][0].run(state)}
          writer.write(step, results)
          logging.info("step %d: %s", step, metrics_lib.format_metrics(results))
        writer.flush()
        checkpointer.save(step, state, force=last)
    if pending is not None:
      report(*pending)
    if preempted:
      checkpointer.save(step, state, force=True)
      logging.warning("stopped on request: checkpoint of step %d saved, exiting", step)
  finally:
    batches.close()
    checkpointer.close()
    writer.close()
  if writer.enabled:
    logging.info("%s at step %d of %d:\n%s", "stopped" if preempted else "finished", step,
                 config.total_steps, metrics_lib.summary(workdir))
  return {"step": step, "preempted": preempted}


def step_flops(model: Any, tx: Any, schedule: Any, config: Any, image_shape: tuple[int, ...],
               batch_spec: dict[str, Any], *, input_dtype: Any = jnp.float32,
               loss_fn: Any = step_lib.classification_loss,
               loss_with_stats_fn: Any = step_lib.classification_loss_with_stats,
               lowered: Any = None) -> float:
  """FLOPs of one whole (global, unpartitioned) train step, from XLA's cost analysis.

  XLA counts the body of a loop once, so a model whose layers are scanned is lowered again
  with the layers unrolled (`scan_layers=False`), and the step without gradient accumulation
  (the same FLOPs: one pass over the whole batch); lowering traces only, nothing is compiled.
  `lowered`, the train step already lowered, is counted instead when it has no such loop.
  """
  scanned = getattr(model, "scan_layers", False)
  if lowered is not None and not scanned and config.grad_accum_steps == 1:
    return _flops(lowered)
  if scanned:
    model = model.clone(scan_layers=False)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          nn.unbox(step_lib.abstract_state(model, tx, image_shape,
                                                           input_dtype)))
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_spec.items()}
  step = step_lib.make_train_step(model, tx, schedule, loss_fn=loss_fn,
                                  loss_with_stats_fn=loss_with_stats_fn)
  return _flops(jax.jit(step).lower(abstract, batch, jax.random.key(0)))


def _flops(lowered: Any) -> float:
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def report_compiled(compiled: Any, num_params: int, num_devices: int,
                    flops: float) -> dict[str, Any]:
  """Prints parameter count, per-device memory of the compiled step and its FLOPs."""
  memory = compiled.memory_analysis()
  mem = {key: int(getattr(memory, f"{key}_size_in_bytes", 0) or 0)
         for key in ("argument", "output", "temp", "alias", "generated_code")}
  mem["peak_estimate"] = mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
  gib = lambda b: f"{b / 2**30:.3f} GiB"  # pylint: disable=unnecessary-lambda-assignment
  print(f"parameters: {num_params}")
  print("memory per device: " + ", ".join(f"{k} {gib(v)}" for k, v in mem.items()))
  print(f"flops per step: {flops:.4g} (about {flops / num_devices:.4g} per device on "
        f"{num_devices} devices)")
  return {"parameters": num_params, "memory": mem, "flops": flops}


def config_and_workdir() -> tuple[Any, str | None]:
  """The parsed `--config` (its `:ARG` and `--config.KEY=VALUE` overrides applied) and
  `--workdir`: for the command lines that take this module's flags (`big_attn.interpret`)."""
  return _CONFIG.value, _WORKDIR.value


def exit_with_error(program: str, error: Exception | str) -> NoReturn:
  """Prints `PROGRAM: error` on stderr, without a traceback, and exits with status 1."""
  print(f"{program}: {error}", file=sys.stderr)
  sys.exit(1)


def _config_spec(args: list[str]) -> str | None:
  """The value of the last `--config` in `args` (absl's flags, before `--`)."""
  spec = None
  for i, arg in enumerate(args):
    if arg == "--":
      break
    match = re.fullmatch(r"-{1,2}config(?:=(.*))?", arg, re.S)
    if match:
      spec = match.group(1) if match.group(1) is not None else next(iter(args[i + 1:i + 2]), None)
  return spec


def _is_bool(config: Any, key: str) -> bool:
  try:
    return isinstance(config_lib.lookup(config, key), bool)
  except KeyError:
    return False


def config_overrides(args: list[str], config: Any) -> list[tuple[str, str | None]]:
  """`[(KEY, VALUE)]` of the `--config.KEY=VALUE` overrides in `args`, as absl reads them:
  `--config.KEY VALUE` takes the next argument unless KEY is a bool; VALUE is None for a bare
  `--config.KEY` or `--noconfig.KEY`."""
  out, i = [], 0
  while i < len(args) and args[i] != "--":
    match = _OVERRIDE.fullmatch(args[i])
    if match:
      negated, key, value = match.groups()
      if value is None and not negated and not _is_bool(config, key) and i + 1 < len(args):
        i += 1
        value = args[i]
      out.append((key, value))
    i += 1
  return out


def parse_flags(argv: list[str], *, program: str = "big_attn.main") -> list[str]:
  """`app.run`'s flag parser: absl's, after checking that `--config` loads and that its
  `--config.KEY=VALUE` overrides name existing keys with values of their type. An error is
  printed as one paragraph `PROGRAM: message` (cause first, full key named) and the process
  exits with status 1."""
  try:
    args = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
    spec = _config_spec(args)
    if spec is not None:
      config = config_lib.load_config_file(spec)
      config_lib.check_overrides(config, config_overrides(args, config))
    elif config_overrides(args, None):
      raise ValueError("--config.KEY=VALUE overrides a key of --config=configs/NAME.py[:ARG], "
                       "which is missing (the configs: --list)")
    return flags.FLAGS(argv)
  except (ValueError, flags.Error) as e:
    exit_with_error(program, e)


def usage() -> str:
  """`--help`: this module's docstring, its flags and `--list`'s listing."""
  own_flags = flags.FLAGS.module_help(__name__).strip().split("\n", 1)[1]  # without its title
  return "\n\n".join([__doc__.strip(), "Flags:\n" + own_flags, catalog.format_listing(),
                       "All flags: --helpfull."])


def parse_main_flags(argv: list[str]) -> list[str]:
  """`parse_flags`, with `--help` printing `usage()` (exit status 0)."""
  if any(arg in _HELP_FLAGS for arg in argv[1:argv.index("--") if "--" in argv else None]):
    print(usage())
    sys.exit(0)
  return parse_flags(argv)


def check_workdir(workdir: str | None) -> None:
  """Raises `ValueError` unless `workdir` is a writable directory or can be created as one."""
  if not workdir:
    raise ValueError("--workdir is required (except with --config.dry_run=True)")
  target = workdir
  if os.path.exists(workdir):
    if not os.path.isdir(workdir):
      raise ValueError(f"--workdir={workdir} exists and is not a directory")
  else:
    while not os.path.exists(target):
      target = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(target):
      raise ValueError(f"--workdir={workdir} cannot be created: {target} is a file, not a "
                       "directory")
  if not os.access(target, os.W_OK | os.X_OK):
    raise ValueError(f"--workdir={workdir} is not writable: no write permission on {target}")


def check_mesh(config: Any) -> None:
  """Raises `ValueError` unless `config.mesh` fits the devices and `config.sharding_rules` map
  to its axes (what the run checks when it builds the mesh, before anything is compiled)."""
  mesh_lib.mesh_shape(config.mesh, jax.device_count(), allow_subset=config.mesh_subset)
  mesh_lib.check_rules(config.sharding_rules)


def main(argv):
  if len(argv) > 1:
    exit_with_error("big_attn.main", f"unexpected arguments {argv[1:]}; flags are --NAME=VALUE "
                    "(see --help)")
  metrics_lib.configure_console(_LOG_LEVEL.value)
  if _LIST.value:
    print(catalog.format_listing())
    return
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    if config is None:
      raise ValueError("--config=configs/NAME.py[:ARG] is required (the configs: --list)")
    check_config(config)
    if not config.dry_run:
      check_workdir(workdir)
    initialize_distributed()
    check_mesh(config)
  except ValueError as e:
    exit_with_error("big_attn.main", e)
  try:
    train_and_evaluate(config, workdir)
  except (RunRefused, ckpt_lib.RestoreError, config_lib.ConfigError) as e:
    exit_with_error("big_attn.main", e)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_main_flags)
