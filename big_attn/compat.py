"""Version shims for the JAX releases we run on (0.10.2 on CPU machines, 0.11.x on GPUs).

Every difference between JAX versions is bridged here, and only here.
"""
from __future__ import annotations

import jax

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())
