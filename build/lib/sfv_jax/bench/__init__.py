"""Benchmarks by subject (unet, pipeline, train, data, fvd): ``sfv-bench SUBJECT``, see ``__main__``."""
