"""The README's Python snippets run as written, top to bottom, in one namespace."""
import pathlib
import re

import jax
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_python_snippets_run():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
  assert len(blocks) >= 4
  namespace = {}
  for block in blocks:
    exec(compile(block, str(README), "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["out"].shape == (2, 128, 8, 64)
  assert namespace["y"].shape == namespace["x"].shape
  assert len(jax.devices()) == 8  # the parallel snippet's mesh needs the simulated devices
