"""What every command does the same way: a quiet console, ``--config NAME`` by name, ``error:`` and exit 2.

Importing this module (every command does, before TensorFlow or JAX) silences TensorFlow's C++ start-up
notices (oneDNN, CUDA probing: TensorFlow only writes TensorBoard events and reads TFDS here; JAX
computes). :func:`run_absl` runs an absl/ml_collections command (train, evaluate, encode-dataset, memory)
with its ``--config`` resolved (:func:`sfv_jax.configs.resolve`) and library INFO chatter filtered;
:func:`fail` prints the one-line ``error: ...`` and returns the exit status 2.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's INFO / WARNING start-up lines
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # its "oneDNN custom operations are on" notice

from sfv_jax import configs, paths  # noqa: E402  (after the environment above: nothing imports TensorFlow before it)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
# Libraries whose INFO lines drown a run's own log (orbax's per-save lines, JAX's compilation cache, clu's
# platform notes); their warnings and errors still show.
_QUIET = ("/orbax/", "/jax/_src/", "/clu/local", "/clu/platform", "/clu/metric_writers", "/absl/logging")


DEBUG_ENV = "SFV_DEBUG"  # set (or --debug on any command line): fail() prints the traceback too


def fail(message: object) -> int:
    """Print ``error: <message>`` to stderr; returns the exit status for bad input (2). With ``--debug``
    (or ``SFV_DEBUG=1``) the traceback of the exception being handled is printed above it."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0") and sys.exc_info()[0] is not None:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def take_debug_flag(argv: list[str]) -> list[str]:
    """``argv`` without ``--debug``; if it was there, ``SFV_DEBUG=1`` for :func:`fail`."""
    if "--debug" in argv:
        os.environ[DEBUG_ENV] = "1"
    return [a for a in argv if a != "--debug"]


def guarded(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """``main(argv)`` with the machine's failures as ``error:`` and exit 2 instead of a traceback: an output
    another command holds or that cannot be a folder (:class:`sfv_jax.paths.OutputError`), an ``OSError`` of
    the environment (a full or read-only disk, permissions, a file where a folder is wanted: the commands
    remove their temp and staging files on the way out); Ctrl-C ends with one line and exit 130. Any other
    exception is a bug and keeps its traceback."""
    try:
        return main(argv)
    except paths.OutputError as e:
        return fail(e)
    except KeyboardInterrupt:
        print("error: interrupted (nothing half-written was kept)", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except OSError as e:
        if (message := paths.os_error_message(e)) is None:
            raise
        return fail(message)


def run_main(main: Callable[[list[str]], int]) -> None:
    """An argparse command's console script: ``--debug`` taken out, then ``sys.exit(main(argv))`` with
    the machine's failures as ``error:`` lines (:func:`guarded`)."""
    sys.exit(guarded(main, take_debug_flag(sys.argv[1:])))


class _QuietLibraries(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(q in record.pathname for q in _QUIET)


def quiet_logging(level: int = logging.INFO) -> None:
    """Root logger at ``level``, with the libraries' INFO lines filtered from every handler."""
    root = logging.getLogger()
    root.setLevel(level)
    for handler in root.handlers:
        handler.addFilter(_QuietLibraries())


def resolve_config_flags(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--config NAME`` / ``--config=NAME`` turned into the packaged config's path (a value
    that is an existing file, or has a ``.py`` suffix, stays as it is: a path)."""
    out, it = [], iter(range(len(argv)))
    for i in it:
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            out += [a, configs.resolve(argv[i + 1])]
            next(it, None)
        elif a.startswith("--config="):
            out.append("--config=" + configs.resolve(a.split("=", 1)[1]))
        else:
            out.append(a)
    return out


def run_absl(main: Callable[[list[str]], int]) -> None:
    """``absl.app.run(main)`` with ``--config`` resolved by name and library logs quietened. An unknown
    config name ends the command with ``error:`` and exit 2 before any flag is parsed."""
    from absl import app

    try:
        argv = resolve_config_flags(take_debug_flag(sys.argv))
    except configs.ConfigNotFound as e:
        sys.exit(fail(e))

    def wrapped(args: list[str]) -> int:
        quiet_logging()
        return guarded(main, args)

    app.run(wrapped, argv=argv, flags_parser=parse_flags)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with the command line's mistakes as ``error: ...`` and exit 2 instead of a
    traceback (a ``--config.KEY`` the config does not have) or absl's FATAL line (a bad value, a missing
    required flag)."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(fail(e))
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a key the config lacks
        given = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        key = str(e).strip("\"'")
        named = next((g for g in given if g.split(".")[-1] == key or g.endswith(f".{key}")), None)
        sys.exit(
            fail(
                f"{named or '--config.' + key}: the config has no key {key!r} (an override can only set a key the "
                f"config file defines; check the spelling and the config's get_config())"
            )
        )
