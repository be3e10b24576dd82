"""Identity similarity for people: cosine of insightface ArcFace embeddings (reference photo's
face vs the face in each generated picture).

Same files and rules as MoA Face Align (align.py): `<root>/models/<name>/*.onnx`, checked before
insightface sees them, never downloaded. Face Align needs only the detector; identity also needs
the recognition model of the same folder (buffalo_l: w600k_r50.onnx, antelopev2: glintr100.onnx).
insightface runs the real pipeline: detection, 5-point alignment (norm_crop to 112x112) and the
ArcFace network; the pack only picks the face and takes the cosine.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .align import (KNOWN_MODELS, find_face_models, import_insightface, load_face_analysis, pick_face,
                    resolve_providers, to_bgr_uint8)
from .errors import FaceAlignError, FaceModelError, FaceNotFoundError

MODULES = ("detection", "recognition")
MIN_BOX_OVERLAP = 0.3          # a face must overlap a given face box this much (IoU) to be taken


def _recognizer_names(name: str) -> str:
    known = KNOWN_MODELS.get(name)
    if known:
        return known[1]
    return "a recognition model (" + ", ".join(f"{k}: {v[1]}" for k, v in KNOWN_MODELS.items()) + ")"


def load_face_recognizer(root, name: str, providers=("CPUExecutionProvider",), det_size: int = 640,
                         det_thresh: float = 0.5):
    """FaceAnalysis with the detector and the ArcFace recognition model of `<root>/models/<name>`;
    a FaceModelError naming the folder and the missing file otherwise."""
    folder = find_face_models(root, name)
    known = KNOWN_MODELS.get(name)
    present = sorted(p.name for p in folder.glob("*.onnx"))
    if known and known[1] not in present:
        raise FaceModelError(
            f"Face model folder {folder} has {', '.join(present)} but not the recognition model {known[1]}: "
            f"identity similarity needs it (MoA Face Align only needs the detector). Copy {known[1]} from "
            f"the {name} zip into {folder}")
    analysis = load_face_analysis(root, name, providers=providers, det_size=det_size, det_thresh=det_thresh,
                                  modules=MODULES)
    if "recognition" not in analysis.models:
        raise FaceModelError(
            f"None of the .onnx files in {folder} ({', '.join(present)}) is a face recognition model insightface "
            f"recognises (ArcFace: one square input of 112 pixels or more, one [N, D] output). Identity "
            f"similarity needs {_recognizer_names(name)} there")
    return analysis


@dataclass(frozen=True)
class FaceIdentity:
    embedding: np.ndarray     # [D], unit length
    bbox: np.ndarray          # [4] x0, y0, x1, y1
    score: float


def _iou(a, b) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def face_identity(image, analysis, box=None, label: str = "image") -> FaceIdentity:
    """The ArcFace identity of one face in `image` (RGB [H, W, 3] in 0..1, numpy or torch).

    box (x0, y0, x1, y1 in pixels): take the detected face that overlaps it most (IoU >= 0.3);
    None: the largest face. FaceNotFoundError names `label` when there is none."""
    if isinstance(image, torch.Tensor):
        image = image.detach().to("cpu", torch.float32).numpy()
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{label}: expected an RGB image [H, W, 3], got shape {list(image.shape)}")
    faces = [f for f in analysis.get(to_bgr_uint8(image)) if getattr(f, "embedding", None) is not None]
    if not faces:
        raise FaceNotFoundError(f"{label}: no face found ({image.shape[1]}x{image.shape[0]} pixels). The identity "
                                f"metric needs a visible, roughly frontal face that is not tiny")
    if box is not None:
        box = [float(v) for v in box]
        if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
            raise ValueError(f"{label}: face box must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0, got {box}")
        best = max(faces, key=lambda f: _iou(f.bbox, box))
        if _iou(best.bbox, box) < MIN_BOX_OVERLAP:
            found = "; ".join("[" + ", ".join(f"{v:.0f}" for v in f.bbox[:4]) + "]" for f in faces)
            raise FaceNotFoundError(f"{label}: no face inside the face box {box} (faces found at {found})")
        face = best
    else:
        face = pick_face(faces, "largest")
    emb = np.asarray(face.embedding, np.float64).reshape(-1)
    norm = float(np.linalg.norm(emb))
    if not np.isfinite(norm) or norm == 0:
        raise FaceAlignError(f"{label}: the recognition model gave an unusable embedding (norm {norm})")
    return FaceIdentity(embedding=emb / norm, bbox=np.asarray(face.bbox, np.float64)[:4], score=float(face.det_score))


def identity_similarity(reference: np.ndarray, identity: FaceIdentity) -> float:
    """Cosine of a reference embedding and a picture's face: 1 = the same embedding."""
    return float(np.clip(np.dot(reference, identity.embedding), -1.0, 1.0))


def face_embedder(analysis):
    """What scoring.evaluator.Evaluator takes: (image [H, W, 3], box, label) -> unit embedding [D]."""
    def embed(image, box, label):
        return torch.from_numpy(face_identity(image, analysis, box, label).embedding).float()
    return embed


def face_embedder_for(root, name: str, provider: str = "CPU"):
    """face_embedder of `<root>/models/<name>`: folder errors first, then the install hint, then the
    models (MoA Face Align's order), on the onnxruntime provider chosen ('CPU', 'CUDA', ...)."""
    find_face_models(root, name)
    import_insightface()
    return face_embedder(load_face_recognizer(root, name, providers=resolve_providers(provider)))
