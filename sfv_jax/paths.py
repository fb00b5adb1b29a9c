"""Output paths that never touch a command's inputs: an output folder that equals, contains or sits inside
an input path is refused before anything is written, with or without ``--overwrite`` (symbolic links
resolved first). Every command that writes a folder checks it here.

    problem = output_overlaps("--out", out, {"--src": src})   # None, or the message to raise
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def output_overlaps(
    out_flag: str, out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None]
) -> str | None:
    """The message for the first input (``{flag: path}``; None entries skipped) that ``out`` equals,
    contains or lies inside, else None. Paths are compared after resolving symbolic links."""
    o = _real(out)
    for flag, path in inputs.items():
        if path is None or str(path) == "":
            continue
        i = _real(path)
        if o == i:
            how = "is"
        elif i.is_relative_to(o):
            how = "contains"
        elif o.is_relative_to(i):
            how = "is inside"
        else:
            continue
        return (
            f"{out_flag} {out} {how} {flag} {path} ({o} vs {i}): an output must not overlap an input, "
            f"with or without --overwrite (nothing was written); choose another {out_flag}"
        )
    return None
