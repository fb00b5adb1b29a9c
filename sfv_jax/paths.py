"""Output paths that never touch a command's inputs: an output folder that equals, contains or sits inside
an input path is refused before anything is written, with or without ``--overwrite`` (symbolic links
resolved first). Every command that writes a folder checks it here.

    problem = output_overlaps("--out", out, {"--src": src})   # None, or the message to raise
    problem = folder_problem("--workdir", workdir)              # a file, or not writable
    write_atomic(path, lambda tmp: tmp.write_text(text))         # never a half-written file at path
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
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


def folder_problem(flag: str, path: str | os.PathLike) -> str | None:
    """The message if ``path`` cannot be a command's output folder (it is a file, or neither it nor its
    nearest existing parent can be written), else None: checked before any work."""
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        return f"{flag} {p}: exists and is not a folder"
    probe = p if p.exists() else next(q for q in p.parents if q.exists())
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        return f"{flag} {p}: {probe} is not a writable folder"
    return None


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)
    return path
