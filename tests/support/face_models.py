"""Tiny stand-ins for insightface's face models, built with the `onnx` package at test time.

insightface routes any ONNX file by its inputs/outputs (model_zoo.ModelRouter): >= 5 outputs is
an SCRFD detector (9 outputs = strides 8/16/32 x score/bbox/keypoints, input NCHW), one square
input >= 112 with one [N, D] output is an ArcFace recognizer. These files have exactly that I/O,
so the real FaceAnalysis loading, routing, SCRFD decoding and NMS run on them offline.

The detector does not detect: at stride 32 it "finds" two faces at fixed places in a 640x640
input, gated by the input's dynamic range (a flat image has no face):
- FACE (score 0.90): the face in skimage.data.astronaut(), boxes/keypoints read off the photo;
- DECOY (score 0.95): a small box in the lower right (not a face), so that "largest" and
  "most confident" pick different faces.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

DET_INPUT = 640
STRIDES = (8, 16, 32)
ANCHORS = 2
# in the 512x512 astronaut photo's pixels
ASTRONAUT_BBOX = (180.0, 62.0, 274.0, 184.0)
ASTRONAUT_KPS = ((202.5, 101.0), (246.0, 102.5), (223.75, 125.0), (206.0, 142.5), (242.5, 142.5))
FACE_SCORE = 0.90
DECOY_BBOX = (400.0, 420.0, 424.0, 444.0)
DECOY_SCORE = 0.95
PHOTO_SIZE = 512           # the detector's boxes are placed for a square photo of this size


def _anchor_values(bbox, kps, stride, cell):
    """SCRFD regression targets (distances in stride units) for the anchor at grid `cell`."""
    scale = DET_INPUT / PHOTO_SIZE
    cx, cy = cell[0] * stride, cell[1] * stride
    x0, y0, x1, y1 = (v * scale for v in bbox)
    dist = np.array([cx - x0, cy - y0, x1 - cx, y1 - cy], np.float32) / stride
    k = (np.asarray(kps, np.float32) * scale - np.array([cx, cy], np.float32)) / stride
    return dist, k.reshape(-1)


def build_detector(path: Path, faces=True) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    stride = 32
    grid = DET_INPUT // stride
    n32 = grid * grid * ANCHORS
    scores = np.zeros((n32, 1), np.float32)
    boxes = np.zeros((n32, 4), np.float32)
    points = np.zeros((n32, 10), np.float32)
    if faces:
        entries = [(ASTRONAUT_BBOX, ASTRONAUT_KPS, FACE_SCORE)]
        decoy_kps = [((DECOY_BBOX[0] + DECOY_BBOX[2]) / 2 + dx, (DECOY_BBOX[1] + DECOY_BBOX[3]) / 2 + dy)
                     for dx, dy in ((-5, -4), (5, -4), (0, 0), (-4, 5), (4, 5))]
        entries.append((DECOY_BBOX, decoy_kps, DECOY_SCORE))
        scale = DET_INPUT / PHOTO_SIZE
        for bbox, kps, score in entries:
            cell = (round((bbox[0] + bbox[2]) / 2 * scale / stride), round((bbox[1] + bbox[3]) / 2 * scale / stride))
            idx = (cell[1] * grid + cell[0]) * ANCHORS
            dist, k = _anchor_values(bbox, kps, stride, cell)
            scores[idx, 0] = score
            boxes[idx] = dist
            points[idx] = k

    inits = [
        numpy_helper.from_array(scores, "s32_const"),
        numpy_helper.from_array(boxes, "bbox32"),
        numpy_helper.from_array(points, "kps32"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.zeros((1, 1), np.float32), "zeros1"),
        numpy_helper.from_array(np.ones((1, 4), np.float32), "ones4"),
        numpy_helper.from_array(np.ones((1, 10), np.float32), "ones10"),
    ]
    nodes = [
        # gate = clip(max(x) - min(x) - 0.5, 0, 1): 1 for a photo, 0 for a flat image
        helper.make_node("ReduceMax", ["input.1"], ["mx"], keepdims=0),
        helper.make_node("ReduceMin", ["input.1"], ["mn"], keepdims=0),
        helper.make_node("Sub", ["mx", "mn"], ["rng"]),
        helper.make_node("Sub", ["rng", "half"], ["rng_h"]),
        helper.make_node("Clip", ["rng_h", "zero", "one"], ["gate"]),
        helper.make_node("Mul", ["s32_const", "gate"], ["score_32"]),
        helper.make_node("Identity", ["bbox32"], ["bbox_32"]),
        helper.make_node("Identity", ["kps32"], ["kps_32"]),
    ]
    outputs = {"score": [], "bbox": [], "kps": []}
    for s in STRIDES:
        n = (DET_INPUT // s) ** 2 * ANCHORS
        outputs["score"].append(helper.make_tensor_value_info(f"score_{s}", TensorProto.FLOAT, [n, 1]))
        outputs["bbox"].append(helper.make_tensor_value_info(f"bbox_{s}", TensorProto.FLOAT, [n, 4]))
        outputs["kps"].append(helper.make_tensor_value_info(f"kps_{s}", TensorProto.FLOAT, [n, 10]))
        if s == 32:
            continue
        shape = f"shape_{s}"
        inits += [numpy_helper.from_array(np.array([n, 1], np.int64), f"{shape}_1"),
                  numpy_helper.from_array(np.array([n, 4], np.int64), f"{shape}_4"),
                  numpy_helper.from_array(np.array([n, 10], np.int64), f"{shape}_10")]
        nodes += [helper.make_node("Expand", ["zeros1", f"{shape}_1"], [f"score_{s}"]),
                  helper.make_node("Expand", ["ones4", f"{shape}_4"], [f"bbox_{s}"]),
                  helper.make_node("Expand", ["ones10", f"{shape}_10"], [f"kps_{s}"])]
    graph = helper.make_graph(
        nodes, "fake_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, DET_INPUT, DET_INPUT])],
        outputs["score"] + outputs["bbox"] + outputs["kps"], initializer=inits)
    return _save(graph, path)


def _save(graph, path: Path) -> Path:
    import onnx
    from onnx import helper
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="moa-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_recognizer(path: Path, dim: int = 512) -> Path:
    """[1, 3, 112, 112] -> [1, dim]: global average pool and a fixed projection."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((3, dim)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input.1"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["683"])],
        "fake_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", dim])],
        initializer=[numpy_helper.from_array(w, "w")])
    return _save(graph, path)


def make_face_model_folder(root: Path, name: str = "fakeface", detector: str = "det_10g.onnx",
                           recognizer: str | None = "w600k_r50.onnx") -> Path:
    """<root>/models/<name>/ with the fake detector (+ recognizer), as the buffalo_l zip lays it out."""
    folder = Path(root) / "models" / name
    build_detector(folder / detector)
    if recognizer:
        build_recognizer(folder / recognizer)
    return folder


def forbid_downloads(monkeypatch) -> None:
    """insightface downloads with no timeout; a test that reaches it must fail at once, not hang."""
    import sys

    import insightface.utils.storage  # noqa: F401  (insightface.utils.download is shadowed by a function)

    def refuse(*a, **k):
        raise AssertionError(f"insightface tried to download: {a} {k}")

    monkeypatch.setattr(sys.modules["insightface.utils.download"], "download_file", refuse)
    monkeypatch.setattr(sys.modules["insightface.utils.storage"], "download_file", refuse)


def astronaut_with(other_photo: np.ndarray, box=(160, 40, 300, 200)) -> np.ndarray:
    """skimage's astronaut (float [512, 512, 3]) with `other_photo`'s pixels pasted over her face:
    a different subject where the stand-in detector finds the face."""
    from PIL import Image
    from skimage import data
    base = data.astronaut().astype(np.float32) / 255
    other = np.asarray(Image.fromarray(np.asarray(other_photo)).convert("RGB").resize((512, 512)), np.float32) / 255
    x0, y0, x1, y1 = box
    base[y0:y1, x0:x1] = other[y0:y1, x0:x1]
    return base
