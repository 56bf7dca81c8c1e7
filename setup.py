"""lcm_jax: a pure-JAX research codebase for few-step diffusion."""
from setuptools import find_packages, setup

setup(
    name="lcm_jax",
    version="0.1.0",
    description="Latent consistency distillation, TCD, Smooth Diffusion and LEGO bricks in JAX.",
    url="https://github.com/lcm-jax/lcm_jax",  # the notebooks' setup cells clone this (tests check)
    packages=find_packages(include=["lcm_jax", "lcm_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "ml-collections",
        "clu",
        "wandb",
        # TensorFlow (for clu's TensorBoard writer and tfds's tf.data reading) is the [tf] extra,
        # so that an installed `tensorflow` (Colab's, a GPU build) satisfies it: pip's
        # "tensorflow-cpu" would install a second TensorFlow over it. Without either, runs skip
        # the TensorBoard files and tfds data is refused with the fix (lcm_jax/colab.py).
        "tensorboard",
        "tensorflow-datasets",
        "importlib_resources",  # tfds needs it for builders inside packages; not always pulled in
        "transformers",  # CLIP tokenizers only
        "safetensors",
        "numpy",
        "pillow",
        "scikit-learn",  # the embedded digits dataset
        "tqdm",
    ],
    extras_require={
        "tf": ["tensorflow-cpu"],
        # torch + diffusers are test-time references only: lcm_jax never imports them.
        # nbclient + ipykernel + matplotlib run notebooks/ in the tests; scikit-image checks SSIM.
        "dev": ["tensorflow-cpu", "pytest", "pytest-xdist", "torch==2.13.0", "diffusers", "peft", "nbclient",
                "nbformat", "ipykernel", "matplotlib", "scikit-image", "filelock"],
    },
)
