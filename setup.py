"""nsa-jax: Native Sparse Attention for JAX, with Pallas kernels for GPU and TPU."""

import pathlib

import setuptools

ROOT = pathlib.Path(__file__).parent

setuptools.setup(
    name="nsa-jax",
    version="0.1.0",
    description="Native Sparse Attention (NSA) for JAX/Flax with Pallas kernels for GPU and TPU",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.12",
    packages=setuptools.find_packages(include=["nsa_jax*", "pallas_kernels*", "experiments*"]),
    install_requires=[
        "jax>=0.11.2",
        "flax>=0.12",
        "optax>=0.2.4",
        "chex>=0.1.90",
        "numpy>=1.26",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6.100"],
        "experiments": ["ml_collections>=1.0", "orbax-checkpoint>=0.11", "grain>=0.2",
                        "matplotlib>=3.8", "tensorboardX>=2.6", "tqdm>=4.66"],
        "gpu": ["jax[cuda13]>=0.11.2"],
        "tpu": ["jax[tpu]>=0.11.2"],
    },
)
