"""Identity similarity for people: the REAL insightface pipeline (FaceAnalysis routing, SCRFD
decoding, norm_crop alignment, the ArcFace recognizer's session) on tiny stand-in ONNX models built
at test time, and a real photo that ships in a wheel (skimage's astronaut, face at a known box)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("insightface")
pytest.importorskip("onnx")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

from support.face_models import (ASTRONAUT_BBOX, DECOY_BBOX, astronaut_with, build_detector,  # noqa: E402
                                 make_face_model_folder)
from support.face_fixtures import face_root, no_downloads  # noqa: E402,F401  (fixtures)

KNOWN_FACE_BOX = (177, 66, 272, 178)        # the astronaut's face, read off the photo


@pytest.fixture(scope="module")
def recognizer(face_root):
    from comfyui_moa.moa_attention.faces import identity
    return identity.load_face_recognizer(face_root, "fakeface")


@pytest.fixture(scope="module")
def astronaut():
    from skimage import data
    return data.astronaut().astype(np.float32) / 255


def test_the_recognizer_is_insightfaces_arcface_on_the_folders_file(recognizer, face_root):
    from insightface.app import FaceAnalysis
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from comfyui_moa.moa_attention.faces import identity
    assert type(recognizer) is FaceAnalysis
    assert set(recognizer.models) == {"detection", "recognition"}
    assert type(recognizer.models["recognition"]) is ArcFaceONNX
    assert recognizer.models["recognition"].input_size == (112, 112)
    assert identity.load_face_recognizer(face_root, "fakeface") is recognizer          # cached


def test_astronaut_identical_is_one_and_a_different_subject_is_less(recognizer, astronaut):
    from skimage import data
    from comfyui_moa.moa_attention.faces import identity
    ref = identity.face_identity(astronaut, recognizer, KNOWN_FACE_BOX, "reference")
    np.testing.assert_allclose(ref.bbox, ASTRONAUT_BBOX, atol=1.0)      # the box picked the astronaut's face
    same = identity.face_identity(astronaut.copy(), recognizer, KNOWN_FACE_BOX, "picture")
    cat = identity.face_identity(astronaut_with(data.chelsea()), recognizer, KNOWN_FACE_BOX, "picture")
    s_same = identity.identity_similarity(ref.embedding, same)
    s_cat = identity.identity_similarity(ref.embedding, cat)
    print(f"\nArcFace identity (tiny stand-in recognizer), astronaut reference: identical photo {s_same:.4f}, "
          f"cat's face pasted over hers {s_cat:.4f}")
    assert s_same == pytest.approx(1.0, abs=1e-6)
    assert s_cat < 0.9
    # the embedding is what insightface's own ArcFace gives for the aligned crop
    from insightface.utils import face_align
    bgr = (np.clip(astronaut, 0, 1) * 255 + 0.5).astype(np.uint8)[..., ::-1]
    face = min(recognizer.get(bgr), key=lambda f: abs(f.bbox[0] - ASTRONAUT_BBOX[0]))
    crop = face_align.norm_crop(bgr, face.kps, 112)
    direct = recognizer.models["recognition"].get_feat(crop).ravel()
    np.testing.assert_allclose(ref.embedding, direct / np.linalg.norm(direct), atol=1e-6)


def test_face_box_selects_the_face_and_says_when_none_is_inside(recognizer, astronaut):
    from comfyui_moa.moa_attention.faces import identity
    largest = identity.face_identity(astronaut, recognizer)
    decoy = identity.face_identity(astronaut, recognizer, DECOY_BBOX)
    assert largest.bbox[0] == pytest.approx(ASTRONAUT_BBOX[0], abs=1) and decoy.bbox[0] >= DECOY_BBOX[0] - 1
    assert identity.identity_similarity(largest.embedding, decoy) < 0.9
    with pytest.raises(identity.FaceNotFoundError, match=r"reference: no face inside the face box .*faces found at \[400, 420"):
        identity.face_identity(astronaut, recognizer, (0, 0, 40, 40), "reference")
    with pytest.raises(ValueError, match="face box must be"):
        identity.face_identity(astronaut, recognizer, (10, 10, 5, 5))


def test_no_face_is_a_clear_error(recognizer):
    from comfyui_moa.moa_attention.faces import identity
    flat = np.full((256, 256, 3), 0.5, np.float32)
    with pytest.raises(identity.FaceNotFoundError, match=r"picture 3: no face found \(256x256 pixels\)"):
        identity.face_identity(flat, recognizer, None, "picture 3")


def test_a_folder_without_the_recognition_model_names_the_file(tmp_path):
    from comfyui_moa.moa_attention.faces import identity
    build_detector(tmp_path / "models" / "buffalo_l" / "det_10g.onnx")
    with pytest.raises(identity.FaceModelError) as e:
        identity.load_face_recognizer(tmp_path, "buffalo_l")
    msg = str(e.value)
    assert "w600k_r50.onnx" in msg and str(tmp_path / "models" / "buffalo_l") in msg and "only needs the detector" in msg
    make_face_model_folder(tmp_path, "mine", recognizer=None)              # unknown name, detector only
    with pytest.raises(identity.FaceModelError, match="is a face recognition model insightface recognises"):
        identity.load_face_recognizer(tmp_path, "mine")
    with pytest.raises(identity.FaceModelError, match="does not exist"):  # MoA Face Align's folder errors
        identity.load_face_recognizer(tmp_path, "antelopev2")
