"""Fixtures the insightface tests share; import them into a test module to use them there:
`from support.face_fixtures import face_root, no_downloads  # noqa: F401`."""
from __future__ import annotations

import pytest

from .face_models import forbid_downloads, make_face_model_folder


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """insightface downloads with no timeout; a test that reaches it must fail, not hang."""
    forbid_downloads(monkeypatch)


@pytest.fixture(scope="module")
def face_root(tmp_path_factory):
    """An insightface root with models/fakeface/: the stand-in detector and recognizer."""
    root = tmp_path_factory.mktemp("insightface")
    make_face_model_folder(root, "fakeface")
    return root
