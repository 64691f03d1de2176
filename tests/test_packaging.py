"""The wheel that `pip install .` installs holds every module of `big_attn` and `pallas_kernels`
(a package folder without `__init__.py` is silently left out by `find_packages`)."""
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("big_attn", "pallas_kernels")
_BUILD = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"


def _source_modules() -> set[str]:
  out = set()
  for package in PACKAGES:
    for directory, dirs, names in os.walk(os.path.join(ROOT, package)):
      dirs[:] = [d for d in dirs if d != "__pycache__"]
      out.update(os.path.relpath(os.path.join(directory, n), ROOT).replace(os.sep, "/")
                 for n in names if n.endswith(".py"))
  return out


def test_every_package_folder_has_an_init():
  missing = []
  for package in PACKAGES:
    for directory, dirs, _ in os.walk(os.path.join(ROOT, package)):
      dirs[:] = [d for d in dirs if d != "__pycache__"]
      if not os.path.exists(os.path.join(directory, "__init__.py")):
        missing.append(os.path.relpath(directory, ROOT))
  assert not missing, f"package folders without __init__.py: {missing}"


def test_the_wheel_holds_every_module(tmp_path):
  if importlib.util.find_spec("setuptools") is None:
    pytest.skip("setuptools (the build backend of pyproject.toml) is not installed")
  # Built from a copy of the sources, as pip builds an sdist: the checkout gets no build/ or
  # *.egg-info, and tests running beside this one see no half-written files.
  source = tmp_path / "src"
  source.mkdir()
  for name in ("setup.py", "pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, name), source / name)
  for package in PACKAGES:
    shutil.copytree(os.path.join(ROOT, package), source / package,
                    ignore=shutil.ignore_patterns("__pycache__"))
  out = tmp_path / "dist"
  out.mkdir()
  proc = subprocess.run([sys.executable, "-c", _BUILD, str(out)], cwd=source,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  wheel = out / proc.stdout.strip().splitlines()[-1]
  with zipfile.ZipFile(wheel) as archive:
    in_wheel = {n for n in archive.namelist() if n.endswith(".py")}
  expected = _source_modules()
  assert "big_attn/train/step.py" in expected and "pallas_kernels/common.py" in expected
  missing = sorted(expected - in_wheel)
  assert not missing, f"modules missing from {wheel.name}: {missing}"
  assert not {n for n in in_wheel if n.split("/")[0] in PACKAGES} - expected
