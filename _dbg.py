import jax, jax.numpy as jnp, numpy as np
from big_attn import interpret
from big_attn.models import vit
from big_attn.tasks import classification_loss
from big_attn.train import regularizers
from tests import reference
from tests.test_regularizers import _adl
model = vit.Model(num_classes=10, width=16, depth=2, mlp_dim=32, num_heads=2,
                  patch_size=(4, 4), head_zeroinit=False, pool_type="cls")
images = reference.normal(0, (2, 8, 8, 1))
params = model.init(jax.random.key(0), images)["params"]
rng = jax.random.key(1)
def maps_of(p):
  return list(interpret.capture_attention(model, {"params": p}, images, train=True, rngs={"dropout": rng}).values())
f = lambda p: regularizers.attention_diversification_loss(maps_of(p), threshold=0.0)
def f_traced(p):
  ms=[]
  def hook(path, op_fn, q, k, v, kw):
    ms.append(interpret.mixing_matrix(op_fn, q, k, v, kw)); return op_fn(q,k,v,**kw)
  with interpret.hook_ops(hook):
    model.apply({"params": p}, images, train=True, rngs={"dropout": rng})
  return regularizers.attention_diversification_loss(ms, threshold=0.0)
print(f_traced(params), _adl(maps_of(params), 0.0))
g = jax.grad(f_traced)(params)
leaves, tree = jax.tree.flatten(params)
d = jax.tree.unflatten(tree, [reference.normal(10 + i, x.shape) for i, x in enumerate(leaves)])
step = lambda s: jax.tree.map(lambda p, dd: p + s * dd, params, d)
for eps in (1e-2,1e-3, 1e-4):
  print(eps, (_adl(maps_of(step(eps)),0.0)-_adl(maps_of(step(-eps)),0.0))/(2*eps), (f_traced(step(eps))-f_traced(step(-eps)))/(2*eps))
print(sum(float(jnp.vdot(a,b)) for a,b in zip(jax.tree.leaves(g), jax.tree.leaves(d))))
for k,v in jax.tree_util.tree_flatten_with_path(g)[0]: print(jax.tree_util.keystr(k), float(jnp.abs(v).max()))
