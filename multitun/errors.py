"""The two kinds of error a user sees as one line and exit status 2."""


class ConfigError(ValueError):
    """A bad setting (flag or config file); its message names what is wrong."""


class SetupError(Exception):
    """Something on this host stops the tunnel from starting."""
