"""The packaged configs, each a ``get_config()`` Python file with its run command in the docstring.

  sfv_svd      the paper's SF-V setting (full SVD, 768x448x14, 8 devices FSDP)
  tiny         SF-V at toy size on a CPU (random-init tiny models, synthetic videos): the Quickstart's tiny run
  svd_finetune SVD's own diffusion objective on full SVD (``svd_finetune:xt``: SVD-XT, 25 frames)
  toy_teacher  the diffusion objective at toy size: the teacher the toy SF-V reproduction distils
  toy_sfv      SF-V distilled from the toy teacher (toy world, 32x32x14)
  eval_ucf101  the paper's FVD protocol (UCF-101, 2048 videos)
  eval_tiny    the FVD protocol at toy size (the smoke evaluation)

Every command takes ``--config NAME`` (one of these) or ``--config PATH`` (any config file; one that
builds on another imports it as ``from sfv_jax.configs import sfv_svd``). The repository's
``configs/`` is this folder.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = tuple(sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_")))


class ConfigNotFound(ValueError):
    """``--config`` names neither a file nor a packaged config."""


def resolve(name_or_path: str) -> str:
    """The config file for ``name_or_path``: a path as it is (an ``ml_collections`` ``:arg`` suffix kept),
    else the packaged config of that name."""
    path, sep, arg = name_or_path.partition(":")
    if Path(path).exists() or path.endswith(".py"):
        return name_or_path
    if path in NAMES:
        return str(HERE / f"{path}.py") + sep + arg
    raise ConfigNotFound(f"--config {name_or_path}: no such file, and not a packaged config ({', '.join(NAMES)})")
