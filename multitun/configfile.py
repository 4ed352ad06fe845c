"""Reading a --config TOML file: its text and syntax, with the one-line
errors the CLI reports (the values are checked by their options)."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import ConfigError


def read_toml(path: Path) -> dict:
    """The file's tables and values; ConfigError naming the file (and the
    line of a syntax error)."""
    try:
        return tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
