"""Which framework an object belongs to, without importing any framework (an object of one means it
is loaded)."""

from __future__ import annotations

import sys
from typing import Any


def is_keras_model(obj: Any) -> bool:
    """Whether ``obj`` is a Keras 3 model."""
    keras = sys.modules.get("keras")
    model_class = getattr(keras, "Model", None) if keras is not None else None
    return isinstance(model_class, type) and isinstance(obj, model_class)
