"""Models: `create_model(name, **overrides)`, `list_models()`, `resolve_model(name)`.

Each registered name is a family class plus its default config; overrides replace config
fields (e.g. img_size, num_classes), and unknown fields are errors naming the closest one.
A new family is one module here that calls `register_model`, plus its import below.
"""

from edgevit.models import efficientvit, swin, vit  # noqa: F401  (families register on import)
from edgevit.models.registry import create_model, list_models, register_model, resolve_model

__all__ = ["create_model", "list_models", "register_model", "resolve_model"]
