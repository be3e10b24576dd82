"""Optional face alignment for human subjects (the MoA paper aligns and crops faces before the
image encoder), on top of insightface's detector and its 5-point ArcFace alignment.

insightface, onnxruntime and cv2 are optional: they are imported inside the functions, so the
pack imports without them, and a clear error says how to install them when alignment is used.

Face models live in `<root>/models/<name>/*.onnx` (root = ComfyUI/models/insightface), e.g.
buffalo_l (det_10g.onnx + w600k_r50.onnx, ...) or antelopev2 (scrfd_10g_bnkps.onnx +
glintr100.onnx, ...). They are checked here BEFORE insightface sees them: given a missing folder,
insightface downloads buffalo_l.zip with no timeout (a hang behind a silent proxy), and given an
empty or double-nested folder it fails with a bare `AssertionError: 'detection' in self.models`.
Only the detector is loaded (allowed_modules=["detection"]); alignment needs nothing else.

The crop. insightface's `face_align.norm_crop` maps the 5 keypoints (eyes, nose tip, mouth
corners) onto the fixed ArcFace template by a similarity transform (no shear, no stretch) into a
tight 112x112 box: eyebrows to lower lip, no hair, no chin. `align_faces` uses that same
transform (`face_align.estimate_norm`) and then zooms out about the centre of the template by
`crop_scale`: the output shows a square `crop_scale` times the side of the ArcFace box.
crop_scale = 1.0 reproduces `norm_crop(img, kps, size)` exactly; the default 1.6 keeps the whole
head (hair above, chin and some neck below, eyes at ~0.47 of the height), FFHQ-like framing
(for comparison, FFHQ's crop rule applied to the template's landmarks gives ~1.3 about nearly
the same centre; 1.6 leaves room for big hair and long faces).
Parts of the square outside the photo are black and 0 in the returned mask, so MoA Subject
paints them its background colour instead of feeding black bars to the image encoder.
"""
from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import FaceModelError, InsightFaceMissingError

log = logging.getLogger("comfyui-moa")

# what the official zips hold (detector first); the detector is all alignment needs
KNOWN_MODELS: dict[str, tuple[str, ...]] = {
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx", "1k3d68.onnx", "2d106det.onnx", "genderage.onnx"),
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx", "1k3d68.onnx", "2d106det.onnx", "genderage.onnx"),
}
DEFAULT_CROP_SCALE = 1.6
TEMPLATE_SIZE = 112            # insightface's ArcFace template lives in a 112x112 box
PICKS = ("largest", "confident")
PROVIDERS = {                  # node choice -> onnxruntime execution provider
    "CPU": "CPUExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "ROCm": "ROCMExecutionProvider",
    "DirectML": "DmlExecutionProvider",
    "OpenVINO": "OpenVINOExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
}
LICENSE_NOTE = "insightface's pretrained face models are for non-commercial research use only."


def _expected_files_text(name: str) -> str:
    files = KNOWN_MODELS.get(name)
    if files:
        return f"{files[0]} (the face detector) + {files[1]}, usually also {', '.join(files[2:])}"
    lines = "; ".join(f"{k}: {v[0]} + {v[1]}" for k, v in KNOWN_MODELS.items())
    return f"a face detector .onnx (SCRFD/RetinaFace); for reference, {lines}"


def _fix_text(root: Path, name: str) -> str:
    return (f"Download {name}.zip from insightface's model zoo (github.com/deepinsight/insightface, "
            f"model_zoo) and unzip it so that the .onnx files lie directly in {root / 'models' / name}. "
            f"{LICENSE_NOTE}")


def find_face_models(root: Path | str, name: str) -> Path:
    """The folder `<root>/models/<name>` if it holds usable .onnx files; else a FaceModelError that
    names the folder, the files expected there and the fix. Never touches insightface."""
    root = Path(root).expanduser()
    name = str(name).strip()
    if not name or any(sep in name for sep in ("/", "\\")) or name in (".", ".."):
        raise FaceModelError(f"Face model name must be a folder name such as 'buffalo_l' or 'antelopev2', "
                             f"got {name!r}")
    folder = root / "models" / name
    expected = _expected_files_text(name)
    if folder.is_dir():
        onnx = sorted(p.name for p in folder.glob("*.onnx") if p.is_file())
        if onnx:
            known = KNOWN_MODELS.get(name)
            if known and known[0] not in onnx:
                raise FaceModelError(
                    f"Face model folder {folder} has {', '.join(onnx)} but not the face detector {known[0]}. "
                    f"Expected there: {expected}. {_fix_text(root, name)}")
            return folder
        nested = sorted({p.parent for p in folder.glob("*/*.onnx") if p.is_file()})
        if nested:
            inner = nested[0]
            raise FaceModelError(
                f"Face model folder {folder} is nested: the .onnx files are in {inner} (the zip extracts into a "
                f"folder of its own). Move the files up one level, so that {folder / '<file>.onnx'} exists, "
                f"e.g. `mv \"{inner}\"/*.onnx \"{folder}\"/`. Expected there: {expected}")
        raise FaceModelError(
            f"Face model folder {folder} has no .onnx files. Expected there: {expected}. {_fix_text(root, name)}")
    # the folder is missing: look for the usual misplacements before saying so
    flat = root / name
    if flat.is_dir() and any(flat.glob("*.onnx")):
        raise FaceModelError(
            f"Face model '{name}' is in {flat}, but insightface looks in {folder} (note the extra 'models' "
            f"level). Move the folder: `mkdir -p \"{root / 'models'}\" && mv \"{flat}\" \"{folder}\"`")
    for zipped in (root / "models" / f"{name}.zip", root / f"{name}.zip"):
        if zipped.is_file():
            raise FaceModelError(
                f"Face model '{name}' is still zipped ({zipped}). Unzip it so that the .onnx files lie directly "
                f"in {folder}. Expected there: {expected}")
    present = sorted(p.name for p in (root / "models").glob("*") if p.is_dir()) if (root / "models").is_dir() else []
    have = f" Folders present in {root / 'models'}: {', '.join(present)}." if present else ""
    raise FaceModelError(
        f"Face model folder {folder} does not exist.{have} Expected there: {expected}. {_fix_text(root, name)} "
        f"(The pack never lets insightface download models: its download has no timeout.)")


def import_insightface():
    """(FaceAnalysis class, insightface.utils.face_align module), or an install hint."""
    try:
        import cv2  # noqa: F401
        import onnxruntime  # noqa: F401
        from insightface.app import FaceAnalysis
        from insightface.utils import face_align
    except ImportError as e:
        missing = (getattr(e, "name", None) or "").split(".")[0] or "insightface"
        py = sys.executable or "python"
        if missing == "cv2":
            how = (f"OpenCV (cv2) is missing: install one flavour into ComfyUI's Python, e.g. "
                   f"`\"{py}\" -m pip install opencv-python-headless` (or opencv-python if you have neither; "
                   f"do not install both, and do not uninstall one that other nodes use)")
        elif missing == "onnxruntime":
            how = (f"onnxruntime is missing: `\"{py}\" -m pip install onnxruntime` "
                   f"(or onnxruntime-gpu for the CUDA provider)")
        elif missing == "insightface":
            how = f"`\"{py}\" -m pip install insightface onnxruntime` (onnxruntime-gpu for the CUDA provider)"
        else:      # insightface is there but one of its own imports is not (0.7.3 needs albumentations, ...)
            pkg = {"skimage": "scikit-image", "sklearn": "scikit-learn", "PIL": "Pillow"}.get(missing, missing)
            how = f"`\"{py}\" -m pip install {pkg}` (insightface imports it)"
        raise InsightFaceMissingError(
            f"MoA Face Align needs the optional insightface package, which is not usable in ComfyUI's Python "
            f"({py}): {e}. Install it with {how}, then restart ComfyUI. It is optional: the other MoA nodes work "
            f"without it.") from e
    return FaceAnalysis, face_align


def resolve_providers(choice: str) -> tuple[str, ...]:
    """Node choice ('CPU', 'CUDA', ...) or a provider name -> onnxruntime providers, CPU as fallback."""
    import onnxruntime
    provider = PROVIDERS.get(choice, choice)
    available = onnxruntime.get_available_providers()
    if provider != "CPUExecutionProvider" and provider not in available:
        log.warning("MoA Face Align: onnxruntime has no %s here (available: %s); using the CPU. For %s install "
                    "the matching onnxruntime package (e.g. onnxruntime-gpu for CUDA).", provider,
                    ", ".join(available), choice)
        return ("CPUExecutionProvider",)
    return (provider,) if provider == "CPUExecutionProvider" else (provider, "CPUExecutionProvider")


_CACHE: dict[tuple, object] = {}
_LOCK = threading.Lock()


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()


def _folder_stamp(folder: Path) -> tuple:
    return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.glob("*.onnx")))


def _prepare(analysis, providers: tuple[str, ...], det_size: int, det_thresh: float) -> None:
    """prepare() across insightface versions: 0.7.3 `prepare(ctx_id, det_thresh=0.5, det_size=(640, 640))`
    (ctx_id required); 2.1 `prepare(ctx_id=0, det_thresh=0.5, det_size=None)` where None means two
    scales (128 and 640). Both: ctx_id < 0 switches every session to the CPU, so only use it for CPU."""
    import inspect
    ctx_id = -1 if providers[0] == "CPUExecutionProvider" else 0
    kwargs = {"det_thresh": det_thresh, "det_size": (int(det_size), int(det_size))}
    try:
        params = inspect.signature(analysis.prepare).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in params}
    except (TypeError, ValueError):
        pass
    analysis.prepare(ctx_id, **kwargs)


def load_face_analysis(root: Path | str, name: str, providers=("CPUExecutionProvider",), det_size: int = 640,
                       det_thresh: float = 0.5, modules: tuple[str, ...] = ("detection",)):
    """insightface FaceAnalysis with the `modules` of `<root>/models/<name>` (default: only the face
    detector; identity.py adds "recognition"), prepared; cached per (root, name, providers,
    det_size, det_thresh, modules) and reloaded when the files change."""
    root = Path(root).expanduser().resolve()
    providers = tuple(providers)
    modules = tuple(modules)
    folder = find_face_models(root, name)      # before insightface: it would download or assert
    key = (str(root), name, providers, int(det_size), float(det_thresh), modules)
    stamp = _folder_stamp(folder)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    FaceAnalysis, _ = import_insightface()
    try:
        # name = the absolute folder: 2.1 uses an existing directory as is, 0.7.3 joins it onto
        # root/models (an absolute path wins) and finds it present, so neither downloads
        analysis = FaceAnalysis(name=str(folder), root=str(root), allowed_modules=list(modules),
                                providers=list(providers))
    except AssertionError as e:
        files = ", ".join(sorted(p.name for p in folder.glob("*.onnx")))
        raise FaceModelError(
            f"None of the .onnx files in {folder} ({files}) is a face detector insightface recognises "
            f"(it needs an SCRFD/RetinaFace model with >= 5 outputs). Expected there: "
            f"{_expected_files_text(name)}. {_fix_text(root, name)}") from e
    except Exception as e:
        raise FaceModelError(f"insightface could not load the face models in {folder}: {type(e).__name__}: {e}. "
                             f"A file may be truncated (re-download it) or not a face model.") from e
    _prepare(analysis, providers, det_size, det_thresh)
    with _LOCK:
        _CACHE[key] = (stamp, analysis)
    return analysis


@dataclass(frozen=True)
class DetectedFace:
    bbox: np.ndarray      # [4] x0, y0, x1, y1 in image pixels
    kps: np.ndarray       # [5, 2] left eye, right eye, nose tip, left mouth corner, right mouth corner
    score: float


def to_bgr_uint8(image: np.ndarray) -> np.ndarray:
    """RGB float [H, W, 3] in 0..1 -> what insightface takes: BGR uint8."""
    return np.ascontiguousarray((np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)[..., ::-1])


def detect_faces(image: np.ndarray, analysis) -> list[DetectedFace]:
    """All faces in one RGB float image [H, W, 3] in 0..1."""
    faces = []
    for f in analysis.get(to_bgr_uint8(image)):
        if f.kps is None:
            continue          # a detector without keypoints cannot align
        faces.append(DetectedFace(bbox=np.asarray(f.bbox, np.float64)[:4], kps=np.asarray(f.kps, np.float64),
                                  score=float(f.det_score)))
    return faces


def pick_face(faces: list, pick: str = "largest"):
    """The face with the largest box, or the most confident one; None when there is none. Takes
    DetectedFace and insightface's own faces alike (both have bbox; "confident" needs score)."""
    if not faces:
        return None
    if pick == "largest":
        return max(faces, key=lambda f: float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])))
    if pick == "confident":
        return max(faces, key=lambda f: f.score)
    raise ValueError(f"pick must be one of {PICKS}, got {pick!r}")


def alignment_matrix(kps: np.ndarray, size: int, crop_scale: float = DEFAULT_CROP_SCALE) -> np.ndarray:
    """2x3 affine photo -> output square: insightface's ArcFace similarity (estimate_norm at 112),
    then a zoom-out by crop_scale about the template centre, scaled to `size`."""
    import warnings
    _, face_align = import_insightface()
    with warnings.catch_warnings():   # scikit-image >= 0.26 deprecates the estimate() insightface calls
        warnings.simplefilter("ignore", FutureWarning)
        m = face_align.estimate_norm(np.asarray(kps, np.float32).reshape(5, 2), TEMPLATE_SIZE)
    m = np.asarray(m, np.float64)
    s = size / (TEMPLATE_SIZE * float(crop_scale))
    c = TEMPLATE_SIZE / 2.0
    out = m * s
    out[:, 2] += size / 2.0 - s * c
    return out


def _warp(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """cv2.warpAffine as norm_crop does it (bilinear, black outside), with an area pre-shrink when the
    crop scales the photo down more than 2x (bilinear warps alias there)."""
    import cv2
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    if scale < 0.5:
        f = scale * 2.0
        h, w = image.shape[:2]
        nw, nh = max(1, round(w * f)), max(1, round(h * f))
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
        matrix = matrix.copy()
        matrix[:, 0] *= w / nw
        matrix[:, 1] *= h / nh
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0.0)


def fit_square(image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole photo fitted into a size x size square (black padding, 0 in the mask)."""
    h, w = image.shape[:2]
    s = size / max(h, w)
    matrix = np.array([[s, 0.0, (size - w * s) / 2.0], [0.0, s, (size - h * s) / 2.0]])
    ones = np.ones((h, w), np.float32)
    return _warp(image, matrix, size), np.clip(_warp(ones, matrix, size), 0.0, 1.0)


def align_one(image: np.ndarray, kps: np.ndarray, size: int = 224,
              crop_scale: float = DEFAULT_CROP_SCALE) -> tuple[np.ndarray, np.ndarray]:
    """One RGB float image + 5 keypoints -> (aligned [size, size, 3], mask [size, size] of the photo area)."""
    matrix = alignment_matrix(kps, size, crop_scale)
    h, w = image.shape[:2]
    aligned = _warp(np.ascontiguousarray(image, np.float32), matrix, size)
    mask = _warp(np.ones((h, w), np.float32), matrix, size)
    return np.clip(aligned, 0.0, 1.0), np.clip(mask, 0.0, 1.0)


def align_faces(images: torch.Tensor, analysis, size: int = 224, pick: str = "largest",
                crop_scale: float = DEFAULT_CROP_SCALE):
    """Detect and align one face per image.

    images: ComfyUI IMAGE [B, H, W, 3] float 0..1. Returns (aligned [B, size, size, 3], masks
    [B, size, size], found: list[bool]). Per image the largest face (pick="largest", by box area)
    or the most confident one (pick="confident") is aligned; where no face is found, found[i] is
    False and that slot holds the whole photo fitted into the square (padding 0 in the mask), so
    the caller decides whether to fail, keep or drop it.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be an IMAGE batch [B, H, W, 3], got shape {list(images.shape)}")
    if pick not in PICKS:
        raise ValueError(f"pick must be one of {PICKS}, got {pick!r}")
    size = int(size)
    if size < 16:
        raise ValueError(f"size must be at least 16, got {size}")
    if not crop_scale > 0:
        raise ValueError(f"crop_scale must be > 0, got {crop_scale}")
    batch = images.detach().to("cpu", torch.float32).numpy()
    aligned, masks, found = [], [], []
    for image in batch:
        face = pick_face(detect_faces(image, analysis), pick)
        if face is None:
            a, m = fit_square(image, size)
        else:
            a, m = align_one(image, face.kps, size, crop_scale)
        aligned.append(a)
        masks.append(m)
        found.append(face is not None)
    out = torch.from_numpy(np.stack(aligned)).to(device=images.device, dtype=images.dtype)
    out_masks = torch.from_numpy(np.stack(masks)).to(device=images.device, dtype=images.dtype)
    return out, out_masks, found
