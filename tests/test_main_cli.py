"""The command lines of big_attn.main, big_attn.interpret and big_attn.ops: errors as one
paragraph with exit status 1 and no traceback, `--config.KEY=VALUE` overrides of every type,
`--help`/`--list` and the op table derived from the code.

Most checks call the flag parser in-process (it exits before absl parses anything); two
subprocesses check the real entry points end to end.
"""
import glob
import os
import runpy
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from big_attn import catalog, models, ops
from big_attn import main as main_lib
from big_attn.interpret import __main__ as interpret_cli
from big_attn.train import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT_DIGITS = os.path.join(ROOT, "configs", "vit_digits.py")


def _exit_message(capsys, *argv):
  """stderr of `parse_flags(["prog", *argv])`, which must exit with status 1."""
  with pytest.raises(SystemExit) as e:
    main_lib.parse_flags(["prog", *argv])
  assert e.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith("big_attn.main: ") and "Traceback" not in err
  assert err.count("\n") == 1, err  # one paragraph
  return err


@pytest.mark.parametrize("argv, message", [
    (["--config.totl_steps=5"],
     "--config.totl_steps: unknown config key config.totl_steps; did you mean "
     "config.total_steps?"),
    (["--config.input.batchsize", "3"], "unknown config key config.input.batchsize; did you "
     "mean config.input.batch_size"),
    (["--config.foo=1"], "unknown config key config.foo; config has keys ckpt_every, dry_run,"),
    (["--config.lr.x=1"], "--config.lr.x: config.lr is 0.002, which has no keys"),
    (["--config.total_steps=abc"],
     "--config.total_steps=abc: config.total_steps is an int (now 1500), cannot read 'abc'"),
    (["--config.mesh=3"], "config.mesh is a list (now [('data', -1)]), cannot read '3' as one "
     "(it is an int)"),
    (["--config.model.patch_size=4"], "config.model.patch_size is a tuple"),
    (["--config.dry_run=maybe"], "config.dry_run is a bool (now False), cannot read 'maybe'"),
    (["--config.lr"], "--config.lr without a value: config.lr is a float"),
])
def test_override_errors_name_the_full_key(capsys, argv, message):
  assert message in _exit_message(capsys, f"--config={VIT_DIGITS}", *argv)


def test_config_file_errors_give_the_cause_first(capsys, tmp_path):
  missing = str(tmp_path / "nope.py")
  assert f"config file '{missing}' not found" in _exit_message(capsys, f"--config={missing}")
  assert ("unknown config arg 'badarg'; known args: attention, family, head_dim, loops, "
          "parallel_block, projections, runlocal, steps"
          in _exit_message(capsys, f"--config={VIT_DIGITS}:badarg=1"))
  assert ("config arg 'steps': cannot read 'many' as int"
          in _exit_message(capsys, "--config", f"{VIT_DIGITS}:steps=many"))
  assert "which is missing" in _exit_message(capsys, "--config.lr=0.1")
  broken = tmp_path / "broken.py"
  broken.write_text("import os\nimport big_attn_no_such_module\n")
  assert (f"config file {broken} cannot be loaded: ModuleNotFoundError: No module named "
          f"'big_attn_no_such_module' ({broken}, line 2)"
          in _exit_message(capsys, f"--config={broken}"))
  broken.write_text("def get_config(:\n")
  assert "cannot be loaded: SyntaxError: " in _exit_message(capsys, f"--config={broken}")
  broken.write_text("x = 1\n")
  assert "defines no get_config" in _exit_message(capsys, f"--config={broken}")


def test_workdir_and_config_values_are_checked_before_the_run(tmp_path, monkeypatch):
  a_file = tmp_path / "file"
  a_file.write_text("")
  with pytest.raises(ValueError, match="exists and is not a directory"):
    main_lib.check_workdir(str(a_file))
  with pytest.raises(ValueError, match=f"cannot be created: {a_file} is a file"):
    main_lib.check_workdir(str(a_file / "run" / "sub"))
  with pytest.raises(ValueError, match="--workdir is required"):
    main_lib.check_workdir(None)
  main_lib.check_workdir(str(tmp_path / "new" / "run"))  # creatable: fine, nothing created
  assert sorted(os.listdir(tmp_path)) == ["file"]
  monkeypatch.setattr(os, "access", lambda path, mode: False)
  with pytest.raises(ValueError, match=f"is not writable: no write permission on {tmp_path}"):
    main_lib.check_workdir(str(tmp_path / "new"))
  config = config_lib.load_config_file(f"{VIT_DIGITS}:runlocal")
  config.input.batch_size = 0
  with pytest.raises(ValueError, match="config.input.batch_size must be a positive int, got 0"):
    main_lib.check_config(config)
  config = config_lib.load_config_file(VIT_DIGITS)
  config.mesh = [("fsdp", 16)]
  with pytest.raises(ValueError, match=r"config.mesh \[\('fsdp', 16\)\] needs 16 devices"):
    main_lib.check_mesh(config)
  config.mesh = [("fsdp", -1)]
  main_lib.check_mesh(config)


def test_list_tuple_and_none_keys_are_overridable():
  assert main_lib.config_overrides(
      ["--config=x.py", "--config.lr", "0.5", "--config.dry_run", "--noconfig.mesh_subset",
       "--config.mesh=[('fsdp', -1)]", "--", "--config.seed=3"],
      config_lib.load_config_file(VIT_DIGITS)) == [
          ("lr", "0.5"), ("dry_run", None), ("mesh_subset", None), ("mesh", "[('fsdp', -1)]")]
  # Through ml_collections' own flag, with the parsers big_attn.main registers for list/None.
  argv = ["prog", f"--config={VIT_DIGITS}", "--config.mesh=[('data', 2), ('fsdp', -1)]",
          "--config.input.data_dir=/data/tfds", "--config.model.patch_size=(2, 2)",
          "--config.lr=0.5"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  loaded = config_lib.load_config_file(VIT_DIGITS)
  config_lib.check_overrides(loaded, main_lib.config_overrides(argv[1:], loaded))
  flag_values(argv)
  config = flag_values.config
  assert config.mesh == [("data", 2), ("fsdp", -1)] and config.input.data_dir == "/data/tfds"
  assert config.model.patch_size == (2, 2) and config.lr == 0.5
  assert config_lib.read_override("input.data_dir", "None", None) is None
  assert config_lib.read_override("evals", "{'eval': {'every': 3}}",
                                  config.evals) == {"eval": {"every": 3}}


def test_help_lists_flags_configs_models_and_ops(capsys):
  with pytest.raises(SystemExit) as e:
    main_lib.parse_main_flags(["prog", "--config=nothing.py", "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  for name in ("--config", "--workdir", "--list", "--coordinator_address", "--helpfull"):
    assert name in out
  for path in glob.glob(os.path.join(ROOT, "configs", "*.py")):
    module = config_lib.load_config_module(path)
    assert f"configs/{os.path.basename(path)} " in out
    assert catalog.summary(module.__doc__)[:40] in " ".join(out.split())
  assert "attention='softmax', steps=1500, runlocal=False" in out  # vit_digits' options
  for key in ("total_steps=1000", "schedule.warmup_steps=0", "input.batch_size=128",
              "mesh=[('data', -1)]"):  # the keys every config has, with base_config's values
    assert key in out
  for name in models.names() + ops.names():
    assert f"  {name} " in out
  rows = {r["name"]: r for r in catalog.op_rows()}
  assert rows["window"]["causal"] is False and rows["softmax"]["causal"] is True
  assert rows["gated_attention"]["params"] == "GatedAttentionParams"
  assert rows["softmax"]["params"] is None and "Attention Is All You Need" in rows["softmax"][
      "summary"]


def test_python_m_big_attn_ops_prints_the_table(capsys):
  runpy.run_module("big_attn.ops", run_name="__main__")
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].split()[:2] == ["op", "causal"]
  rows = [line.split()[:2] for line in lines[2:] if line and not line.startswith(" ")]
  assert [name for name, _ in rows] == ops.names()
  assert {name: causal == "yes" for name, causal in rows} == {
      name: ops.has_causal_form(name) for name in ops.names()}


def test_interpret_refuses_a_language_model_run(tmp_path):
  workdir = str(tmp_path / "lm")
  config_lib.save_config(config_lib.load_config_file(
      os.path.join(ROOT, "configs", "lm_bytes.py:runlocal")), workdir)
  with pytest.raises(ValueError, match="model_name='lm', which big_attn.interpret does not "
                     "explain: it explains ViT-like image classifiers .* families .*vit"):
    interpret_cli.explain(None, workdir, 0)


@pytest.mark.parametrize("key, value, message", [
    ("optax_name", "adamx",
     "config.optax_name must be one of ('adamw', 'lion', 'sgd', 'adafactor')"),
    ("model.attention_impl", "cuda", "config.model: implementation must be one of"),
    ("evals.eval.batch_size", 0, "config.evals.eval: batch_size must be a positive int, got 0"),
    ("model_name", "vit9", "config.model_name: unknown model 'vit9'; known models:"),
])
def test_setup_errors_name_their_config_key(tmp_path, key, value, message):
  # Raised before anything is compiled or written to a checkpoint; main() prints them as one
  # line with exit status 1 (`ConfigError`, as for RunRefused above).
  config = config_lib.load_config_file(f"{VIT_DIGITS}:runlocal")
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  with node.unlocked():
    node[leaf] = value
  with pytest.raises(config_lib.ConfigError) as e:
    main_lib.train_and_evaluate(config, str(tmp_path / "run"))
  assert str(e.value).startswith(message), str(e.value)
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def _run(*argv):
  return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, check=False)


@pytest.mark.slow
def test_entry_points_exit_with_one_line_and_no_traceback(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("")
  # The mesh override passes through ml_collections; then the workdir is refused.
  proc = _run("big_attn.main", "--config=configs/vit_digits.py:runlocal",
              "--config.mesh=[('fsdp', -1)]", f"--workdir={a_file}")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert f"big_attn.main: --workdir={a_file} exists and is not a directory" in proc.stderr
  workdir = str(tmp_path / "lm")
  config_lib.save_config(config_lib.load_config_file(
      os.path.join(ROOT, "configs", "lm_bytes.py:runlocal")), workdir)
  proc = _run("big_attn.interpret", f"--workdir={workdir}", "--image=0")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "big_attn.interpret: the run trains model_name='lm'" in proc.stderr
