"""big_attn: attention mechanisms of the research literature, at scale, in JAX."""
from setuptools import find_packages, setup

# Converters from timm / transformers checkpoints (big_attn.pretrained), CPU is enough. torch is
# pinned because torchvision (which timm imports) imports only as the pair torch==2.14.1 /
# torchvision==0.29.1 on these machines: CPU-only torch 2.13.0 has no torchvision that imports
# beside it.
PRETRAINED = ["torch==2.14.1", "torchvision==0.29.1", "timm>=1.0.20,<2",
              "transformers>=5.24,<6", "safetensors>=0.4,<1"]
EXTRAS = {
    "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "tensorflow-datasets>=4.9,<5",
             "nbclient>=0.10,<1", "nbformat>=5.10,<6", "ipykernel>=6.29,<8", *PRETRAINED],
    "pretrained": PRETRAINED,
    "notebooks": ["jupyterlab>=4,<5", "ipykernel>=6.29,<8"],
    "tfds": ["tensorflow-datasets>=4.9,<5"],
    "tensorboard": ["tensorboard>=2.16,<3"],
}
# Every optional feature; the test tools are not one.
EXTRAS["all"] = sorted({req for name, reqs in EXTRAS.items() if name != "test" for req in reqs})

setup(
    name="big_attn",
    version="0.1.0",
    description="Attention ops, Pallas kernels, sequence parallelism and training in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["big_attn", "big_attn.*", "pallas_kernels", "pallas_kernels.*"]),
    install_requires=[
        "jax>=0.10.2,<0.12",
        "flax>=0.12,<0.14",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "chex>=0.1.90,<0.2",
        "ml-collections>=1.0,<2",
        "grain>=0.2.12,<0.3",
        "absl-py>=2.1,<3",
        "numpy>=1.26,<3",
        "scikit-learn>=1.4,<2",
        "matplotlib>=3.8,<4",
    ],
    extras_require=EXTRAS,
)
