"""freeanchor: the FreeAnchor detector (NeurIPS 2019) on PyTorch, MMDetection-exact.

`import freeanchor` is light (no torch): the names that need torch (the model, the loss, the
pipeline, `Results`) are imported on first use, so `freeanchor --help` and `freeanchor config`
answer at once.
"""

from freeanchor.config import Config, ModelConfig, preset
from freeanchor.errors import FreeAnchorError
from freeanchor.version import __version__

__all__ = [
    "Config", "FreeAnchor", "FreeAnchorError", "FreeAnchorLoss", "ModelConfig", "Pipeline",
    "Results", "__version__", "build_model", "load_model", "preset",
]  # fmt: skip

# public name -> (module, attribute), imported on first access
_LAZY = {
    "FreeAnchor": ("freeanchor.models.detector", "FreeAnchor"),
    "build_model": ("freeanchor.models.detector", "build_model"),
    "load_model": ("freeanchor.models.weights", "load_model"),
    "FreeAnchorLoss": ("freeanchor.models.loss", "FreeAnchorLoss"),
    "Results": ("freeanchor.results", "Results"),
    "Pipeline": ("freeanchor.inference", "Pipeline"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'freeanchor' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
