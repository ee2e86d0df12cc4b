"""edgevit: put Vision Transformers on edge devices.

Stages are modules, each a verb over a typed artifact (see README). This package import
stays light: torch, tvm and onnxruntime are imported by the stage modules that need them.
"""

__version__ = "0.1.0"

from edgevit.errors import EdgeVitError  # noqa: E402  (errors are dependency-free)

__all__ = ["EdgeVitError", "__version__"]
