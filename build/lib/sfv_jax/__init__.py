"""sfv_jax: SF-V (single forward video generation) on a JAX/Flax port of Stable Video Diffusion."""

__version__ = "0.1.0"
