"""MoA Face Align, offline: the REAL insightface FaceAnalysis (model routing, SCRFD decoding, NMS)
and ArcFace alignment on a real photo, with tiny stand-in ONNX models built at test time
(tests/support/face_models.py). Nothing may download: any attempt fails the test at once."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("insightface")
pytest.importorskip("onnx")
# insightface's own estimate_norm calls a scikit-image API deprecated in 0.26 (the pack silences it too)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

from support.face_models import ASTRONAUT_KPS, DECOY_BBOX, build_detector, build_recognizer  # noqa: E402
from support.face_fixtures import face_root, no_downloads  # noqa: E402,F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def _engine():
    # imported with plain torch: no ComfyUI needed for the face code itself
    from comfyui_moa.moa_attention.faces import align as face_align
    return face_align


@pytest.fixture(scope="module")
def analysis(face_root):
    return _engine().load_face_analysis(face_root, "fakeface")


@pytest.fixture(scope="module")
def astronaut():
    from skimage import data
    return torch.from_numpy(data.astronaut()).float()[None] / 255


def test_real_faceanalysis_loads_only_the_detector_and_is_cached(face_root, analysis):
    from insightface.app import FaceAnalysis
    fa = _engine()
    assert type(analysis) is FaceAnalysis
    assert set(analysis.models) == {"detection"}          # the recognizer file is routed, then skipped
    assert type(analysis.det_model).__name__ in ("SCRFD", "RetinaFace")
    assert fa.load_face_analysis(face_root, "fakeface") is analysis
    assert fa.load_face_analysis(str(face_root), "fakeface", providers=["CPUExecutionProvider"]) is analysis


def test_detector_output_is_decoded_to_the_astronauts_face(analysis, astronaut):
    fa = _engine()
    faces = fa.detect_faces(astronaut[0].numpy(), analysis)
    assert len(faces) == 2
    face = fa.pick_face(faces, "largest")
    np.testing.assert_allclose(face.kps, np.array(ASTRONAUT_KPS), atol=0.5)
    assert 177 <= face.bbox[0] < face.bbox[2] <= 280 and 55 <= face.bbox[1] < face.bbox[3] <= 190
    decoy = fa.pick_face(faces, "confident")
    assert decoy.score > face.score and decoy.bbox[0] >= DECOY_BBOX[0] - 1


def test_aligned_crop_is_insightfaces_norm_crop_of_the_face(analysis, astronaut):
    from insightface.utils import face_align as ifa
    fa = _engine()
    image = astronaut[0].numpy()
    kps = fa.pick_face(fa.detect_faces(image, analysis)).kps.astype(np.float32)

    tight, tight_mask, found = fa.align_faces(astronaut, analysis, size=224, crop_scale=1.0)
    assert found == [True]
    ref = ifa.norm_crop(image, kps, image_size=224)
    assert float(np.abs(tight[0].numpy() - ref).max()) < 1e-3
    assert bool((tight_mask == 1).all())

    out, mask, found = fa.align_faces(astronaut, analysis)          # default: size 224, crop_scale 1.6
    assert found == [True]
    assert out.shape == (1, 224, 224, 3) and mask.shape == (1, 224, 224)
    assert out.dtype == astronaut.dtype and float(out.min()) >= 0 and float(out.max()) <= 1
    assert float(out.std()) > 0.1                                    # a picture, not a flat fill
    # the keypoints land on the ArcFace template, zoomed out about its centre (a least-squares
    # similarity: the centroids match exactly, each point within the fit's residual)
    m = fa.alignment_matrix(kps, 224, fa.DEFAULT_CROP_SCALE)
    landed = np.c_[kps, np.ones(5)] @ m.T
    template = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                         [41.5493, 92.3655], [70.7299, 92.2041]])
    target = (template - 56) * 224 / (112 * 1.6) + 112
    np.testing.assert_allclose(landed.mean(0), target.mean(0), atol=1e-3)
    assert float(np.abs(landed - target).max()) < 5
    # and its centre is the tight crop, smaller
    import cv2
    inner = round(224 / 1.6)
    lo = (224 - inner) // 2
    centre = cv2.resize(out[0].numpy()[lo:lo + inner, lo:lo + inner], (112, 112), interpolation=cv2.INTER_AREA)
    ref112 = ifa.norm_crop(image, kps, image_size=112)
    assert float(np.abs(centre - ref112).mean()) < 0.03


def test_pick_and_size(analysis, astronaut):
    fa = _engine()
    big, _, _ = fa.align_faces(astronaut, analysis, size=128, pick="largest")
    small, _, _ = fa.align_faces(astronaut, analysis, size=128, pick="confident")
    assert big.shape == small.shape == (1, 128, 128, 3)
    assert float((big - small).abs().mean()) > 0.05                  # the decoy crop is somewhere else
    with pytest.raises(ValueError, match="pick must be one of"):
        fa.align_faces(astronaut, analysis, pick="first")


def test_mask_is_zero_where_the_crop_leaves_the_photo(analysis, astronaut):
    fa = _engine()
    out, mask, _ = fa.align_faces(astronaut, analysis, size=160, crop_scale=4.0)   # reaches above the photo
    assert float(mask[0, :10].max()) == 0.0 and float(mask[0, 80, 80]) == 1.0
    assert float(out[0][mask[0] == 0].abs().max()) == 0.0          # black there, as norm_crop pads


def test_no_face_gives_the_whole_photo_and_found_false(analysis, astronaut):
    fa = _engine()
    flat = torch.full((1, 512, 512, 3), 0.5)
    batch = torch.cat([astronaut, flat])
    out, mask, found = fa.align_faces(batch, analysis, size=96)
    assert found == [True, False]
    assert torch.allclose(out[1], torch.full((96, 96, 3), 0.5), atol=1e-3) and bool((mask[1] == 1).all())
    wide = torch.full((1, 256, 512, 3), 0.5)                         # fitted into the square, padding masked out
    out, mask, found = fa.align_faces(wide, analysis, size=64)
    assert found == [False]
    assert float(mask[0, 0].max()) == 0.0 and float(mask[0, 32].min()) == 1.0 and float(mask[0, 63].max()) == 0.0


# --- errors: everything is checked before insightface sees the folder -------------------------------

def test_missing_folder_names_folder_files_and_fix(tmp_path):
    fa = _engine()
    (tmp_path / "models" / "antelopev2").mkdir(parents=True)
    with pytest.raises(fa.FaceModelError) as e:
        fa.load_face_analysis(tmp_path, "buffalo_l")
    msg = str(e.value)
    assert str(tmp_path / "models" / "buffalo_l") in msg
    assert "det_10g.onnx" in msg and "w600k_r50.onnx" in msg and "unzip" in msg.lower()
    assert "antelopev2" in msg                                       # what is there instead
    assert "non-commercial" in msg


def test_empty_folder(tmp_path):
    fa = _engine()
    (tmp_path / "models" / "antelopev2").mkdir(parents=True)
    with pytest.raises(fa.FaceModelError, match="no .onnx files") as e:
        fa.load_face_analysis(tmp_path, "antelopev2")
    assert "scrfd_10g_bnkps.onnx" in str(e.value) and "glintr100.onnx" in str(e.value)


def test_nested_zip_layout_is_named(tmp_path):
    fa = _engine()
    inner = tmp_path / "models" / "antelopev2" / "antelopev2"
    build_detector(inner / "scrfd_10g_bnkps.onnx")
    with pytest.raises(fa.FaceModelError, match="nested") as e:
        fa.find_face_models(tmp_path, "antelopev2")
    assert str(inner) in str(e.value) and "mv " in str(e.value)


def test_other_misplacements(tmp_path):
    fa = _engine()
    build_detector(tmp_path / "buffalo_l" / "det_10g.onnx")          # missing the models/ level
    with pytest.raises(fa.FaceModelError, match="extra 'models' level"):
        fa.find_face_models(tmp_path, "buffalo_l")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "antelopev2.zip").write_bytes(b"PK")
    with pytest.raises(fa.FaceModelError, match="still zipped"):
        fa.find_face_models(tmp_path, "antelopev2")
    build_recognizer(tmp_path / "models" / "buffalo_l" / "w600k_r50.onnx")   # known name, detector missing
    with pytest.raises(fa.FaceModelError, match="not the face detector det_10g.onnx"):
        fa.find_face_models(tmp_path, "buffalo_l")
    with pytest.raises(fa.FaceModelError, match="folder name"):
        fa.find_face_models(tmp_path, "../buffalo_l")


def test_folder_without_a_detector_is_not_a_bare_assertion(tmp_path):
    fa = _engine()
    build_recognizer(tmp_path / "models" / "mine" / "rec.onnx")
    with pytest.raises(fa.FaceModelError, match="is a face detector insightface recognises"):
        fa.load_face_analysis(tmp_path, "mine")


@pytest.mark.parametrize("module, hint", [("insightface", "pip install insightface onnxruntime"),
                                          ("cv2", "opencv-python-headless"),
                                          ("onnxruntime", "pip install onnxruntime")])
def test_missing_packages_give_an_install_hint(monkeypatch, face_root, module, hint):
    fa = _engine()
    fa.clear_cache()
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(fa.InsightFaceMissingError) as e:
        fa.load_face_analysis(face_root, "fakeface")
    assert isinstance(e.value, ImportError)
    assert hint in str(e.value) and sys.executable in str(e.value) and "restart ComfyUI" in str(e.value)


def test_a_missing_dependency_of_insightface_is_named(monkeypatch):
    """insightface 0.7.3's `insightface.app` imports albumentations (and skimage, ...) itself."""
    import builtins
    fa = _engine()
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("insightface"):
            raise ModuleNotFoundError("No module named 'albumentations'", name="albumentations")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(fa.InsightFaceMissingError, match="pip install albumentations` \\(insightface imports it\\)"):
        fa.import_insightface()


def test_pack_modules_do_not_import_optional_packages_at_top_level():
    optional = {"insightface", "cv2", "onnxruntime", "onnx"}
    for rel in ("moa_attention/faces/align.py", "nodes/face_align.py"):
        tree = ast.parse((ROOT / rel).read_text())
        for node in tree.body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in optional for n in names), f"{rel} imports {names} at top level"


# --- the node, in-process in ComfyUI ---------------------------------------------------------------

@pytest.fixture
def node_root(comfy, face_root, monkeypatch):
    import folder_paths
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "insightface", ([str(face_root)], {".onnx"}))
    return face_root


def test_node_is_registered_with_tooltips(comfy, node_root):
    _, pack = comfy
    from comfyui_moa.nodes.face_align import MoAFaceAlign
    assert pack.NODE_CLASS_MAPPINGS["MoAFaceAlign"] is MoAFaceAlign
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["MoAFaceAlign"] == "MoA Face Align"
    assert MoAFaceAlign.CATEGORY == "MoA" and "insightface" in MoAFaceAlign.DESCRIPTION
    required = MoAFaceAlign.INPUT_TYPES()["required"]
    assert all(opts.get("tooltip") for _, opts in required.values())
    names = required["face_model"][0]
    assert names[0] == "fakeface" and {"buffalo_l", "antelopev2"} <= set(names)
    assert required["if_no_face"][0] == ["error", "keep original"]
    import folder_paths
    assert folder_paths.get_folder_paths("insightface")[0] == str(Path(folder_paths.models_dir) / "insightface")


def test_node_aligns_and_feeds_moa_subject(comfy, node_root, astronaut):
    from comfyui_moa.nodes.face_align import MoAFaceAlign
    from comfyui_moa.nodes.subject import MoASubject
    image, mask = MoAFaceAlign().align(astronaut, "fakeface", "CPU", 224, 1.6, "error")
    assert image.shape == (1, 224, 224, 3) and mask.shape == (1, 224, 224)
    subjects = MoASubject().build(image, "woman", mask=mask)[0]
    assert subjects[0].images.shape == (1, 224, 224, 3)
    # an unavailable provider falls back to the CPU instead of failing
    image2, _ = MoAFaceAlign().align(astronaut, "fakeface", "CUDA", 224, 1.6, "error")
    assert torch.allclose(image, image2)


def test_node_no_face_error_or_keep(comfy, node_root, astronaut):
    from comfyui_moa.nodes.face_align import MoAFaceAlign
    batch = torch.cat([astronaut, torch.full((1, 512, 512, 3), 0.3)])
    with pytest.raises(ValueError, match=r"no face found in photo 2 of 2 .*'keep original'"):
        MoAFaceAlign().align(batch, "fakeface", "CPU", 128, 1.6, "error")
    image, mask = MoAFaceAlign().align(batch, "fakeface", "CPU", 128, 1.6, "keep original")
    assert image.shape == (2, 128, 128, 3)
    assert torch.allclose(image[1], torch.full((128, 128, 3), 0.3), atol=1e-3)


def test_node_missing_model_names_the_folder(comfy, node_root, astronaut):
    from comfyui_moa.moa_attention.faces.align import FaceModelError
    from comfyui_moa.nodes.face_align import MoAFaceAlign
    import folder_paths
    with pytest.raises(FaceModelError) as e:
        MoAFaceAlign().align(astronaut, "antelopev2", "CPU", 224, 1.6, "error")
    # the folder where ComfyUI users put it (the first registered root), and the files expected there
    assert str(Path(folder_paths.models_dir) / "insightface" / "models" / "antelopev2") in str(e.value)
    assert "scrfd_10g_bnkps.onnx" in str(e.value)
