"""Lower rooms never import upper rooms: the Pallas kernels import nothing of `big_attn` but
`big_attn.compat`, and models never import the training loop (`big_attn.train`, `big_attn.main`).

Every import statement of every source file is read (imports inside functions included), and
`pallas_kernels` is imported and run in a process where `big_attn.ops` cannot be imported.
"""
import ast
import os
import subprocess
import sys

from big_attn import tasks
from big_attn.train import step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imported_modules(path: str) -> set[str]:
  """Absolute names of every module `path` imports; `from a import b` gives `a` and `a.b`."""
  package = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), filename=path)
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        base = f"{parent}.{base}" if base else parent
      out.add(base)
      out.update(f"{base}.{alias.name}" for alias in node.names)
  return out


def _sources(package: str) -> list[str]:
  paths = []
  for directory, _, names in os.walk(os.path.join(ROOT, package)):
    paths.extend(os.path.join(directory, n) for n in sorted(names) if n.endswith(".py"))
  return sorted(paths)


def _violations(package: str, forbidden, allowed=()) -> dict[str, list[str]]:
  """`{file: [modules]}` of imports in `package` under a `forbidden` prefix, except the modules
  named in `allowed`."""
  out = {}
  for path in _sources(package):
    bad = sorted(m for m in _imported_modules(path)
                 if any(m == f or m.startswith(f + ".") for f in forbidden)
                 and m not in allowed)
    if bad:
      out[os.path.relpath(path, ROOT)] = bad
  return out


def test_import_scan_sees_every_form(tmp_path):
  # The scan itself: plain, from-package, dotted and function-level imports are all found.
  source = tmp_path / "m.py"
  source.write_text("import big_attn.ops.common\nfrom big_attn import ops\n"
                    "def f():\n  from big_attn.train import step\n")
  assert {"big_attn.ops.common", "big_attn.ops", "big_attn.train.step"} <= _imported_modules(
      str(source))


def test_kernels_import_nothing_of_big_attn_but_compat():
  assert _sources("pallas_kernels"), "no kernel sources found"
  # `from big_attn import compat` imports the package `big_attn` (its __init__ imports nothing).
  assert _violations("pallas_kernels", ["big_attn"], allowed=["big_attn", "big_attn.compat"]) == {}


def test_models_do_not_import_the_training_loop():
  assert _violations(os.path.join("big_attn", "models"),
                     ["big_attn.train", "big_attn.main"]) == {}


def test_the_training_step_keeps_the_task_names():
  for name in ("BATCH_STATS", "CLASSIFICATION", "Task", "classification_loss",
               "classification_loss_with_stats", "classification_losses", "count_params",
               "init_model_variables"):
    assert getattr(step, name) is getattr(tasks, name), name


_BLOCKED_OPS_RUN = r"""
import importlib.abc, sys

class BlockOps(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name == "big_attn.ops" or name.startswith("big_attn.ops."):
      raise ImportError(f"{name} is blocked: kernels must not import big_attn.ops")
    return None

sys.meta_path.insert(0, BlockOps())
import jax, jax.numpy as jnp
import pallas_kernels
from pallas_kernels.flash_attention import api, gpu_triton, reference, tpu  # noqa: F401
q = jnp.ones((1, 3, 2, 4), jnp.float32)
out = pallas_kernels.flash_attention_reference(q, q, q, is_causal=True)
assert out.shape == q.shape, out.shape
assert not [m for m in sys.modules if m.startswith("big_attn.ops")]
print("kernels without big_attn.ops: ok")
"""


def test_kernels_import_and_run_with_big_attn_ops_blocked():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _BLOCKED_OPS_RUN], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "kernels without big_attn.ops: ok" in proc.stdout
