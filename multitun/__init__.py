"""multitun: one TUN device, every packet over every path, the first copy wins."""

from ._version import __version__

__all__ = ["__version__"]
