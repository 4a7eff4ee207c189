"""freeanchor: the FreeAnchor detector (NeurIPS 2019) on PyTorch, MMDetection-exact."""

from freeanchor.config import Config, ModelConfig, preset
from freeanchor.errors import FreeAnchorError
from freeanchor.models.loss import FreeAnchorLoss

__version__ = "0.1.0"

__all__ = [
    "Config", "FreeAnchor", "FreeAnchorError", "FreeAnchorLoss", "ModelConfig", "Pipeline",
    "Results", "__version__", "build_model", "load_model", "preset",
]  # fmt: skip


def __getattr__(name: str):
    # The detector pulls in torchvision; import it only when asked for.
    if name in ("FreeAnchor", "build_model", "load_model"):
        from freeanchor.models import detector, weights

        return {
            "FreeAnchor": detector.FreeAnchor,
            "build_model": detector.build_model,
            "load_model": weights.load_model,
        }[name]
    if name == "Results":
        from freeanchor.results import Results

        return Results
    if name == "Pipeline":
        from freeanchor.inference import Pipeline

        return Pipeline
    raise AttributeError(name)
