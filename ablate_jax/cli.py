"""Command-line parsing shared by every command (``train``, ``anchors``, ``evaluate``, ``export``).

Each command builds its own ``FlagValues`` with ``--config`` (an ml_collections config file),
``--workdir`` and the multi-process flags of :mod:`ablate_jax.distributed`. ``--config.KEY=VALUE``
overrides go through the config's own setter, the one the ``:arg`` string uses. Every failure
becomes one line in the command's own error type.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable

import ml_collections

from ablate_jax import distributed


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """(the other arguments, ``(key, value, as given)`` for each ``--config.KEY=VALUE`` override).

    Overrides are applied by :func:`ablate_jax.config.override`, the setter the ``:arg`` string
    uses, so both routes parse a value the same way and name an unknown key the same way.
    ``--config.KEY VALUE`` works too; a bare ``--config.KEY`` means true.
    """
    rest: list[str] = []
    overrides: list[tuple[str, str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config.") and arg != "--config.":
            body = arg[len("--config."):]
            if "=" in body:
                key, value = body.split("=", 1)
                overrides.append((key, value, arg))
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                overrides.append((body, argv[i + 1], f"{arg} {argv[i + 1]}"))
                i += 1
            else:
                overrides.append((body, "true", arg))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def flag_values(argv: list[str], workdir_help: str):
    """A ``FlagValues`` with ``--config`` and ``--workdir``; the caller adds its own flags to it."""
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    fv = flags.FlagValues()
    # ``sys_argv`` without the overrides: config_flags would otherwise define a flag for each and
    # apply them with its own parser; they are applied in :func:`parse` instead.
    config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/xattn.py[:concept=toy_striped]",
                                    flag_values=fv, sys_argv=split_overrides(argv)[0])
    flags.DEFINE_string("workdir", None, workdir_help, flag_values=fv)
    distributed.define_flags(fv)
    return fv


def help_requested(argv: list[str], fv, summary: str, usage: str) -> bool:
    """Prints the command's summary, usage and flags if ``argv`` asks for help; returns whether it did."""
    if not any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        return False
    print(f"{summary}\n\nusage: {usage}\n\n{fv.get_help()}")
    return True


def one_line(err: BaseException) -> str:
    """The line to show for ``err``: config_flags wraps a config file's error in its traceback text."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    if any(ln.startswith("Traceback (most recent call last)") for ln in lines):
        match = re.match(r"^[\w.]+: (.*)$", lines[-1])  # "package.ConfigError: unknown config key 'x'"
        return match.group(1) if match else lines[-1]
    return lines[0]


def parse(fv, argv: list[str], error: Callable[[str], Exception], *,
          workdir_required: bool = True) -> tuple[ml_collections.ConfigDict, str | None]:
    """Parses ``argv`` into ``fv`` and starts the multi-process runtime if asked: the config and the workdir.

    Raises ``error(message)`` for a missing, unloadable or misspelled config, an unknown config
    key or a value of the wrong type, an unknown flag, a missing ``--workdir``, arguments left
    over, or multi-process flags that do not fit. The config is not resolved here
    (:func:`ablate_jax.config.resolve` does that once the run starts).
    """
    from absl import flags  # noqa: PLC0415

    from ablate_jax import config as config_lib  # noqa: PLC0415

    argv, overrides = split_overrides(argv)
    try:
        rest = fv(argv)
    except flags.Error as err:
        raise error(one_line(err)) from err
    except (SyntaxError, ImportError) as err:  # raised by the config file itself, unwrapped
        raise error(f"cannot load the config file ({type(err).__name__}: {err})") from err
    try:
        config = fv.config
    except Exception as err:  # noqa: BLE001  (config_flags re-raises the file's own failure here)
        raise error(_config_failure(fv, err)) from err
    if config is None:
        raise error("--config is required, e.g. --config=configs/xattn.py")
    if not isinstance(config, ml_collections.ConfigDict):  # config_flags' stand-in for a file that failed to load
        raise error(_config_failure(fv, object.__getattribute__(config, "_error")))
    for key, value, given in overrides:
        if not config_lib.has_key(config, key):
            raise error(f"unknown config key {key!r} (from {given})")
        try:
            config_lib.override(config, key, value)
        except config_lib.ConfigError as err:
            raise error(str(err)) from err
    if workdir_required and not fv.workdir:
        raise error("--workdir is required")
    if len(rest) > 1:
        raise error(f"unexpected arguments: {' '.join(rest[1:])}")
    try:
        distributed.initialize_from_flags(fv)
    except distributed.DistributedError as err:
        raise error(str(err)) from err
    return config, fv.workdir


def _config_failure(fv, err: BaseException) -> str:
    path = fv["config"].config_filename
    if path and not os.path.isfile(path):
        return f"config file {path} does not exist"
    return f"cannot load the config file {path} ({one_line(err)})"


def configure_logging(level: int = logging.WARNING, absl_level: int = logging.WARNING) -> None:
    """A command's log: this package's stages at INFO, other loggers at ``level``, absl's at ``absl_level``
    (orbax, TensorFlow and TFDS report every read and write through absl)."""
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("ablate_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(absl_level)
