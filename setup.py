"""distill: a pure-JAX framework for diffusion distillation."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.10,<0.12",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "ml-collections>=1.0",
    "chex>=0.1.90",
    "numpy>=1.26",
    "scipy>=1.11",
    "pillow>=10",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "safetensors>=0.4",
    "scikit-learn>=1.3",   # the bundled handwritten digits of the demo
]

EXTRAS = {
    # Everything the tests need. torch is pinned to the CPU build these machines serve offline:
    # an unpinned torch resolves to a multi-GB CUDA build.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "diffusers>=0.35", "peft>=0.13",
             "transformers>=4.40"],
    # Ahead-of-time compiles for TPU topologies on a CPU host (launch/aot.py).
    # (libtpu pinned to the release verified with jax 0.10 / 0.11 compiles on CPU hosts.)
    "tpu": ["libtpu==0.0.52"],
    # Large-scale input pipelines (grain over ArrayRecord; tfds reads without TensorFlow).
    "data": ["grain>=0.2", "tensorflow-datasets>=4.9", "array-record>=0.5"],
}

setup(
    name="distill",
    version="0.1.0",
    description="Pure-JAX diffusion distillation: sCM, consistency, DMD2, SiD and more, "
                "sharded and resumable.",
    packages=find_packages(include=["distill", "distill.*", "models", "models.*", "launch",
                                    "launch.*", "configs", "configs.*"]),
    # The digit classifier of the `fd` metric and the demo's shipped teacher (converted Orbax).
    package_data={"distill.metrics": ["assets/*.npz"],
                  "configs.demo": ["teacher_ckpt/*.json", "teacher_ckpt/**/*"]},
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
)
