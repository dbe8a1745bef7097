"""What every entry point in experiments/ shares: flag parsing that turns a bad config override
into one line naming the flag, instead of a traceback."""
from __future__ import annotations

import re
import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
    """`app.run(main, flags_parser=parse_flags)`: absl parsing, with config errors made readable."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        _exit(argv, str(err))
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        # ml_collections raises these for --config.FIELD overrides it cannot apply.
        _exit(argv, f"bad --config override{_culprits('config', err)}: {err}".replace('"', ""))


def _exit(argv: list[str], message: str) -> None:
    sys.stderr.write(f"FATAL Flags parsing error: {message}\n"
                     f"Pass --helpfull to see help on flags.\n")
    sys.exit(1)


def define_config_file(name: str = "config", default: str | None = None,
                       help_string: str = "config file") -> None:
    """`config_flags.DEFINE_config_file`, locked (a misspelt override fails), whose override
    errors — raised while the default config loads, before `app.run` — become one line."""
    from ml_collections import config_flags

    try:
        config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        _exit(sys.argv, f"bad --{name} override{_culprits(name, err)}: {err}".replace('"', ""))


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
