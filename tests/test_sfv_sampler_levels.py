"""The SF-V sampler's noise levels: the generator's trained levels by default, the grid's untrained last level
only when asked (docs/method.md, "Sampling")."""

from __future__ import annotations

import numpy as np
import pytest

from sfv_jax.diffusion import edm


def test_sfv_sampler_levels():
    np.testing.assert_allclose(edm.sfv_sigmas(3), edm.generator_sigma_levels()[::-1], rtol=1e-6)
    with pytest.raises(ValueError, match="never trained on"):
        edm.sfv_sigmas(4)
    assert edm.sfv_sigmas(4, untrained=True)[-1] == pytest.approx(edm.SIGMA_MIN, rel=1e-5)
