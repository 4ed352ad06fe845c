"""The two kinds of error a user sees as one line and exit status 2, and the
command-line parser that reports bad arguments the same way."""

import argparse


class ConfigError(ValueError):
    """A bad setting (flag or config file); its message names what is wrong."""


class SetupError(Exception):
    """Something on this host stops the tunnel from starting."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, not argparse's usage block: a service log stays readable.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
