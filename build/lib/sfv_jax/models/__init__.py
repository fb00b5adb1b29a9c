"""Flax linen ports of the Stable Video Diffusion networks."""

from sfv_jax.models.unet import UNetConfig, UNetSpatioTemporal

__all__ = ["UNetConfig", "UNetSpatioTemporal"]
