"""Command-line parsing shared by the single-phase commands (``generate``, ``evaluate``, ``export``).

Each command builds its own ``FlagValues`` with ``--config`` (an ml_collections config file,
``--config.KEY=VALUE`` overrides), ``--workdir`` and the multi-process flags of
:mod:`ablate_jax.distributed`, because ``ablate_jax.train`` imports these
modules and defines its own ``--config`` on absl's global flags. Every failure becomes one
line in the command's own error type.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import ml_collections

from ablate_jax import distributed


def flag_values(argv: list[str], workdir_help: str):
    """A ``FlagValues`` with ``--config`` and ``--workdir``; the caller adds its own flags to it.

    config_flags registers the ``--config.*`` overrides from the argv it is given at definition,
    so it must be the command's own argument list, not ``sys.argv``.
    """
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/xattn.py[:concept=toy_striped]",
                                    flag_values=fv, sys_argv=argv)
    flags.DEFINE_string("workdir", None, workdir_help, flag_values=fv)
    distributed.define_flags(fv)
    return fv


def one_line(err: BaseException) -> str:
    """The line to show for ``err``: config_flags wraps a config file's error in its traceback text."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    if any(ln.startswith("Traceback (most recent call last)") for ln in lines):
        match = re.match(r"^[\w.]+: (.*)$", lines[-1])  # "package.ConfigError: unknown config key 'x'"
        return match.group(1) if match else lines[-1]
    return lines[0]


def parse(fv, argv: list[str], error: Callable[[str], Exception]) -> tuple[ml_collections.ConfigDict, str]:
    """Parses ``argv`` into ``fv`` and starts the multi-process runtime if asked: the config and the workdir.

    Raises ``error(message)`` for a missing, unloadable or misspelled config, an unknown flag,
    a missing ``--workdir``, arguments left over, or multi-process flags that do not fit.
    """
    from absl import flags  # noqa: PLC0415

    try:
        rest = fv(argv)
    except flags.Error as err:
        raise error(one_line(err)) from err
    except (SyntaxError, ImportError) as err:  # raised by the config file itself, unwrapped
        raise error(f"cannot load the config file ({type(err).__name__}: {err})") from err
    except (AttributeError, KeyError) as err:  # an override such as --config.eval.nope=1
        key = str(err).strip("'\"")
        flagged = [a.split("=", 1)[0] for a in argv if a.startswith("--config.") and key in a.split("=", 1)[0]]
        raise error(f"unknown config key {key!r} in {', '.join(flagged) or 'a --config.* flag'}") from err
    config = fv.config
    if config is None:
        raise error("--config is required, e.g. --config=configs/xattn.py")
    if not isinstance(config, ml_collections.ConfigDict):  # config_flags' stand-in for a file that failed to load
        path = fv["config"].config_filename
        if not os.path.isfile(path):
            raise error(f"config file {path} does not exist")
        raise error(f"cannot load the config file {path} ({one_line(object.__getattribute__(config, '_error'))})")
    if not fv.workdir:
        raise error("--workdir is required")
    if len(rest) > 1:
        raise error(f"unexpected arguments: {' '.join(rest[1:])}")
    try:
        distributed.initialize_from_flags(fv)
    except distributed.DistributedError as err:
        raise error(str(err)) from err
    return config, fv.workdir
