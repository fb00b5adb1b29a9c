"""Training data: the embedded synthetic video dataset and on-the-fly latent encoding."""
