"""MoA Face Align: detect, align and crop the face in subject photos (optional; needs insightface)."""
from __future__ import annotations

import logging
from pathlib import Path

from ..moa_attention.faces import align as faces
from .common import CATEGORY, INSIGHTFACE_FOLDER, check_finite, refusals, refuse, register_insightface_folder

NODE = "MoA Face Align"

log = logging.getLogger("comfyui-moa")

IF_NO_FACE = ("error", "keep original")


def _roots() -> list[Path]:
    import folder_paths
    register_insightface_folder()
    return [Path(p) for p in folder_paths.get_folder_paths(INSIGHTFACE_FOLDER)]


def face_model_names() -> list[str]:
    """Folders under <insightface>/models in every registered root, then the usual names not present
    (choosing a missing one gives an error that says where its files go)."""
    found: list[str] = []
    for root in _roots():
        models = root / "models"
        if models.is_dir():
            found += sorted(p.name for p in models.iterdir() if p.is_dir() and p.name not in found)
    return found + [n for n in faces.KNOWN_MODELS if n not in found]


def face_model_root(name: str) -> Path:
    """The first registered root that has models/<name>; else the first root (for the error message)."""
    roots = _roots()
    for root in roots:
        if (root / "models" / name).is_dir():
            return root
    return roots[0]


class MoAFaceAlign:
    DESCRIPTION = ("Finds the face in each photo with insightface, aligns it upright on the eyes, nose and mouth "
                   "(the 5-point ArcFace alignment) and crops it with hair and chin, as the MoA paper prepares "
                   "human subjects. Feed IMAGE and MASK to MoA Subject. Needs the optional insightface package "
                   "and a face model (e.g. buffalo_l) in models/insightface/models/<name>/; insightface's "
                   "pretrained models are for non-commercial research use only.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    OUTPUT_TOOLTIPS = ("The aligned face crops, size x size, one per input photo.",
                       "1 where the crop shows the photo, 0 where it reached past the photo's edge (black there); "
                       "MoA Subject paints that part as background.")
    FUNCTION = "align"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "Photo(s) of the person. Each photo gives one aligned face (the "
                                               "largest face in it)."}),
                "face_model": (face_model_names(), {"tooltip":
                               "insightface model folder in ComfyUI/models/insightface/models/ (only its face "
                               "detector is used): buffalo_l (det_10g.onnx) or antelopev2 "
                               "(scrfd_10g_bnkps.onnx). The .onnx files must lie directly in that folder. Press R "
                               "to refresh the list after copying one in."}),
                "provider": (list(faces.PROVIDERS), {"default": "CPU", "tooltip":
                             "Where onnxruntime runs the detector. CPU always works and is fast enough for a "
                             "few photos; CUDA/ROCm/DirectML/OpenVINO/CoreML need the matching onnxruntime "
                             "package (otherwise it falls back to the CPU with a warning)."}),
                "size": ("INT", {"default": 224, "min": 64, "max": 2048, "step": 8, "tooltip":
                         "Side of the square output in pixels. 224 is what the CLIP image encoder sees."}),
                "crop_scale": ("FLOAT", {"default": faces.DEFAULT_CROP_SCALE, "min": 1.0, "max": 4.0,
                                         "step": 0.05, "tooltip":
                               "How much around the face to keep, as a multiple of the tight ArcFace face box "
                               "(eyebrows to lower lip). 1.0 = that tight box (insightface norm_crop); 1.6 = "
                               "the whole head with hair and chin; larger = more shoulders and background."}),
                "if_no_face": (list(IF_NO_FACE), {"default": "error", "tooltip":
                               "What to do with a photo where no face is found. error: stop and say which photo. "
                               "keep original: pass the whole photo through, fitted into the square, with a "
                               "warning."}),
            },
        }

    def align(self, image, face_model, provider, size, crop_scale, if_no_face):
        check_finite(NODE, image=image)
        root = face_model_root(face_model)
        with refusals(NODE):
            faces.find_face_models(root, face_model)    # folder errors before anything is imported
            faces.import_insightface()                  # install hint if insightface is missing
            providers = faces.resolve_providers(provider)
            analysis = faces.load_face_analysis(root, face_model, providers=providers)
            aligned, masks, found = faces.align_faces(image, analysis, size=size, crop_scale=crop_scale)
        missing = [i + 1 for i, ok in enumerate(found) if not ok]
        if missing:
            which = ", ".join(str(i) for i in missing)
            where = (f"photo {which} of {len(found)}" if len(missing) == 1 else f"photos {which} of {len(found)}")
            if if_no_face == "error":
                raise refuse(NODE,
                    f"no face found in {where} (face model '{face_model}'). Use a photo where the "
                    f"face is clearly visible, roughly frontal and not tiny (crop a large photo around the person), "
                    f"remove that photo from the batch, or set if_no_face to 'keep original' to pass it through "
                    f"uncropped.")
            log.warning("MoA Face Align: no face found in %s; passing it through uncropped (if_no_face = "
                        "'keep original').", where)
        return (aligned, masks)

