"""The errors of the face models, in the pack's MoAError family (so nodes prefix them like any
other refusal), kept with the faces code that raises them."""
from __future__ import annotations

from ..engine.errors import MoAError


class FaceAlignError(MoAError, RuntimeError):
    """A face-model or face-alignment problem with a message that says what to do."""


class FaceModelError(FaceAlignError):
    """The face-model folder is missing, empty, nested or has no detector."""


class InsightFaceMissingError(FaceAlignError, ImportError):
    """insightface (or one of its dependencies) is not installed in ComfyUI's Python."""


class FaceNotFoundError(FaceAlignError, ValueError):
    """No face (or none inside the given face box) in a picture the identity metric needs."""
