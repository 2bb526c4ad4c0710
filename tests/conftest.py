"""Shared pytest set-up: tests marked ``@pytest.mark.gpu`` run only where torch sees a CUDA GPU."""

from __future__ import annotations

import importlib.util

import pytest


def _no_gpu_reason() -> str | None:
    """Why GPU tests cannot run here, or ``None`` when torch sees a CUDA GPU."""
    if importlib.util.find_spec("torch") is None:
        return "needs a CUDA GPU: torch is not installed"
    import torch

    if not torch.cuda.is_available():
        return f"needs a CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__})"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the ``gpu`` tests, with the reason, where no GPU exists (torch is imported only if one is
    collected)."""
    marked = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not marked:
        return
    reason = _no_gpu_reason()
    if reason is not None:
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=reason))
