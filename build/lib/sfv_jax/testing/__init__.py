"""The PyTorch reference for parity tests, the demo and the benchmarks (the dev extras: torch, diffusers,
transformers). :func:`require_dev_extras` ends a command that needs them with one clear line when they
are missing."""

from __future__ import annotations

import importlib.util
import sys

DEV_EXTRAS = ("torch", "diffusers", "transformers")


def missing_dev_extras() -> list[str]:
    return [name for name in DEV_EXTRAS if importlib.util.find_spec(name) is None]


def require_dev_extras(what: str) -> None:
    """Exit with ``error: ...`` (status 2) when torch, diffusers or transformers is not installed."""
    missing = missing_dev_extras()
    if missing:
        print(
            f"error: {what} needs the PyTorch reference ({', '.join(missing)} not installed): "
            f"pip install -e '.[dev]' (or bash launch/setup.sh --dev)",
            file=sys.stderr,
        )
        sys.exit(2)
