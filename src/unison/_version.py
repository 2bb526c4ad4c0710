"""The version of unison (one place: the package and every experiment's record read it here)."""

__version__ = "0.1.0"
