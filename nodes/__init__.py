"""The node classes of comfyui-moa, one file per concern; this module only collects them."""
from .adapter_loader import MoAAdapterLoader
from .apply import MoAApply
from .common import register_model_folder
from .dataset import MoASaveTrainingExample
from .evaluate import MoAEvaluate
from .face_align import MoAFaceAlign
from .inversion import MoADDIMInversionSampler, MoAInvertPhoto
from .morph import MoASubjectMorph
from .router_maps import MoARouterMaps
from .subject import MoASubject

NODE_CLASS_MAPPINGS = {
    "MoAAdapterLoader": MoAAdapterLoader,
    "MoASubject": MoASubject,
    "MoAApply": MoAApply,
    "MoARouterMaps": MoARouterMaps,
    "MoAFaceAlign": MoAFaceAlign,
    "MoAEvaluate": MoAEvaluate,
    "MoASubjectMorph": MoASubjectMorph,
    "MoAInvertPhoto": MoAInvertPhoto,
    "MoADDIMInversionSampler": MoADDIMInversionSampler,
    "MoASaveTrainingExample": MoASaveTrainingExample,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "MoAAdapterLoader": "MoA Adapter Loader",
    "MoASubject": "MoA Subject",
    "MoAApply": "MoA Apply",
    "MoARouterMaps": "MoA Router Maps",
    "MoAFaceAlign": "MoA Face Align",
    "MoAEvaluate": "MoA Evaluate",
    "MoASubjectMorph": "MoA Subject Morph",
    "MoAInvertPhoto": "MoA Invert Photo",
    "MoADDIMInversionSampler": "MoA DDIM Inversion Sampler",
    "MoASaveTrainingExample": "MoA Save Training Example",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "register_model_folder"]
