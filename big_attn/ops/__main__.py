"""Prints the table of registered attention ops: `python -m big_attn.ops`.

Each row: the registry name, whether the op has a causal form (`is_causal=True`), the Linen
module owning its learned weights (`big_attn.ops.params_module`) and the first paragraph of
its docstring (the mechanism and its paper).
"""
from big_attn import catalog

if __name__ == "__main__":
  print(catalog.format_ops())
