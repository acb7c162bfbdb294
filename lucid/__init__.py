"""Lucid: an API gateway whose capabilities are swappable pluggy plugins."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lucid-gateway")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
