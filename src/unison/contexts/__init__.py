"""Contexts: declarative descriptions of what to run (a search, later ablations and distributed runs)."""

from unison.contexts.search import Search

__all__ = ["Search"]
