"""What every entry point in experiments/ shares: `run(main)`, which answers a usage error with one
line (not the flag list) and keeps libraries' internal logging quiet unless --verbosity is given,
and flag parsing that turns a bad config override into one line naming the flag."""
from __future__ import annotations

import functools
import logging as python_logging
import os
import re
import sys

from absl import app, flags

# Where the INFO records a user wants come from; other libraries' (JAX's backend probes, orbax's
# byte budgets) show with --verbosity=1 or higher. Their warnings and errors always show.
_OWN_CODE = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d) + os.sep
                  for d in ("sdjax", "experiments"))


class _OwnInfoOnly(python_logging.Filter):
    def filter(self, record: python_logging.LogRecord) -> bool:
        return record.levelno >= python_logging.WARNING or record.pathname.startswith(_OWN_CODE)


def run(main) -> None:
    """`app.run(main)` with quiet library logging and one-line answers to usage errors and to the
    problems a user can fix (bad values: ValueError; files and folders: OSError). --verbosity=1
    shows those with their traceback."""
    @functools.wraps(main)
    def wrapped(argv):
        verbose = flags.FLAGS.verbosity >= 1
        if not verbose:
            for handler in python_logging.getLogger().handlers:
                handler.addFilter(_OwnInfoOnly())
        try:
            return main(argv)
        except app.UsageError as err:
            _exit(argv, str(err))
        except (ValueError, OSError) as err:
            if verbose:
                raise
            _exit(argv, _one_line(err), hint="--verbosity=1 shows where it came from")

    app.run(wrapped, flags_parser=parse_flags)


def parse_flags(argv: list[str]) -> list[str]:
    """`app.run(main, flags_parser=parse_flags)`: absl parsing, with config errors made readable."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        _exit(argv, str(err))
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        # ml_collections raises these for --config.FIELD overrides it cannot apply.
        _exit(argv, f"bad --config override{_culprits('config', err)}: {err}".replace('"', ""))


def _exit(argv: list[str], message: str, hint: str = "--help lists the flags") -> None:
    program = os.path.basename(argv[0]) if argv else "sdjax"
    sys.stderr.write(f"{program}: error: {message}\n({hint})\n")
    sys.exit(1)


def _one_line(err: Exception) -> str:
    """An OSError as `path: reason`, anything else as its message."""
    if isinstance(err, OSError) and err.strerror:
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f)
        return f"{where}: {err.strerror}" if where else err.strerror
    return str(err)


def define_config_file(name: str = "config", default: str | None = None,
                       help_string: str = "config file") -> None:
    """`config_flags.DEFINE_config_file`, locked (a misspelt override fails), whose override
    errors — raised while the default config loads, before `app.run` — become one line.

    A config path (the default or `--NAME=PATH[:ARG]`) is read relative to the working directory,
    else to the folder that holds sdjax's `configs` package, so entry points run from anywhere."""
    from ml_collections import config_flags

    for index, arg in enumerate(sys.argv):
        if arg.startswith(f"--{name}="):
            sys.argv[index] = f"--{name}={_config_path(name, arg.split('=', 1)[1])}"
    if default is not None:
        default = _config_path(name, default)
    try:
        config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        _exit(sys.argv, f"bad --{name} override{_culprits(name, err)}: {err}".replace('"', ""))


def _config_path(name: str, value: str) -> str:
    """`PATH[:ARG]` with PATH made absolute (see define_config_file); a missing file is one line."""
    import importlib.util

    path, colon, arg = value.partition(":")
    if os.path.isfile(path):
        return value
    spec = importlib.util.find_spec("configs")
    home = os.path.dirname(list(spec.submodule_search_locations)[0]) if spec else None
    if home and os.path.isfile(os.path.join(home, path)):
        return os.path.join(home, path) + colon + arg
    where = os.getcwd() + (f" or {home}" if home and home != os.getcwd() else "")
    _exit(sys.argv, f"--{name}: no config file {path!r} (looked in {where})")


def _culprits(name: str, err: Exception) -> str:
    """The override flags an error is about: those naming a word the message quotes, else all."""
    overrides = [a for a in sys.argv[1:] if a.startswith(f"--{name}.")]
    quoted = set(re.findall(r"'([^']+)'", str(err)))
    named = [a for a in overrides
             if quoted & set(re.split(r"[.=]", a.split("=", 1)[0][len(name) + 3:]))]
    chosen = named or overrides
    return f" ({', '.join(chosen)})" if chosen else ""


def apply_shortcuts(config, shortcuts) -> None:
    """Copy the shortcut flags that were given onto their config fields. `shortcuts`: flag names
    equal to their fields, or a {flag: field} mapping."""
    mapping = shortcuts if isinstance(shortcuts, dict) else {name: name for name in shortcuts}
    with config.unlocked():
        for flag, field in mapping.items():
            if flags.FLAGS[flag].value is not None:
                setattr(config, field, flags.FLAGS[flag].value)
