"""`python -m moa_attention.evaluate FOLDER` on a folder of pictures with a sidecar manifest: the
table is written as CSV and strict JSON; bad rows (missing file, size mismatch, no face, broken
JSON) get their own errors and the other rows still get their numbers. Faces go through the real
insightface code on tiny stand-in ONNX models; CLIP numbers through ComfyUI's CLIP objects."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("insightface")
pytest.importorskip("onnx")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

from support.face_models import astronaut_with, make_face_model_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FACE_BOX = [177, 66, 272, 178]


def _save(arr: np.ndarray, path: Path) -> str:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.asarray(arr)
    a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8) if a.dtype != np.uint8 else a
    Image.fromarray(a).save(path)
    return str(path.name if path.parent.name == "" else path.relative_to(path.parents[1]))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Six manifest lines: two good pictures, then one bad thing per line."""
    from PIL import Image
    from skimage import data
    d = tmp_path_factory.mktemp("evalset")
    ast = data.astronaut().astype(np.float32) / 255
    mask = np.zeros((512, 512), np.float32)
    mask[40:330, 120:360] = 1                                        # the astronaut, roughly
    g = np.random.default_rng(0)
    moa = ast.copy()
    moa[mask > 0] = np.clip(moa[mask > 0] + g.normal(0, 0.03, moa[mask > 0].shape), 0, 1)   # subject redrawn
    _save(ast, d / "refs" / "astronaut.png")
    _save(ast, d / "base" / "0001.png")
    _save(moa, d / "moa" / "0001.png")
    _save(mask, d / "masks" / "0001.png")
    router = np.asarray(Image.fromarray((mask * 200 + 20).astype(np.uint8)).resize((64, 64)))  # latent-sized map
    _save(router, d / "maps" / "0001.png")
    _save(astronaut_with(data.chelsea()), d / "moa" / "0002.png")
    Image.fromarray((ast * 255).astype(np.uint8)).resize((256, 256)).save(d / "base" / "small.png")
    from safetensors.torch import save_file
    lat = torch.zeros(1, 4, 64, 64)
    save_file({"latent_tensor": lat, "latent_format_version_0": torch.tensor([])}, str(d / "base" / "0001.latent"))
    lat[..., 10:40, 20:40] = 1.0                                    # inside the subject mask (at 1/8 scale)
    save_file({"latent_tensor": lat, "latent_format_version_0": torch.tensor([])}, str(d / "moa" / "0001.latent"))
    grey = np.full((512, 512, 3), 0.5, np.float32)
    _save(grey, d / "moa" / "grey.png")
    _save(grey, d / "base" / "grey.png")
    common = {"references": ["refs/astronaut.png"], "reference_face_box": FACE_BOX, "mask": "masks/0001.png",
              "prompt": "an astronaut"}
    lines = [
        {"image": "moa/0001.png", "label": "good", "baseline": "base/0001.png", "router_map": "maps/0001.png",
         "latent": "moa/0001.latent", "baseline_latent": "base/0001.latent", "face_box": FACE_BOX, **common},
        {"image": "moa/0002.png", "label": "cat face", "baseline": "base/0001.png", **common},
        {"image": "moa/missing.png", "label": "missing file", **common},
        {"image": "moa/0001.png", "label": "size mismatch", "baseline": "base/small.png", **common},
        {"image": "moa/grey.png", "label": "no face", "baseline": "base/grey.png", "latent": "moa/0001.latent",
         **common},
    ]
    text = "\n".join(json.dumps(x) for x in lines[:3]) + '\n{"image": "moa/0001.png", "label": \n' + \
        "\n".join(json.dumps(x) for x in lines[3:]) + "\n"
    (d / "manifest.jsonl").write_text(text)
    clip_lines = [lines[i] for i in (0, 2, 4)] + [   # fewer ViT-L passes; whole pictures vs the whole reference:
        {"image": "refs/astronaut.png", "label": "identical", "references": ["refs/astronaut.png"]},
        {"image": "moa/grey.png", "label": "grey, whole picture", "references": ["refs/astronaut.png"]}]
    (d / "clip.jsonl").write_text("\n".join(json.dumps(x) for x in clip_lines) + "\n")
    root = tmp_path_factory.mktemp("insightface")
    make_face_model_folder(root, "fakeface")
    return d, root


def _strict_json(path: Path) -> dict:
    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name} in {path}")
    return json.loads(path.read_text(), parse_constant=no_constants)


def test_cli_writes_the_table_and_per_row_errors(folder):
    d, root = folder
    proc = subprocess.run([sys.executable, "-m", "moa_attention.evaluate", str(d), "--face-model", "fakeface",
                           "--insightface", str(root)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 1, proc.stderr[-3000:]                  # some rows have errors; files written anyway
    rows = list(csv.DictReader(open(d / "evaluation.csv")))
    by = {r["label"]: r for r in rows}
    assert [r["line"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    good = by["good"]
    assert good["status"] == "ok" and good["errors"] == ""
    assert 0.95 < float(good["identity_arcface"]) <= 1.0
    assert float(good["change_outside"]) == 0.0 and good["psnr_outside"] == "inf" and float(good["ssim_outside"]) == pytest.approx(1.0)
    assert float(good["change_inside"]) > 0.01 and float(good["psnr_inside"]) < 40
    assert float(good["router_background_share"]) < 0.2 < 0.7 < float(good["router_subject_share"])
    assert float(good["latent_change_outside"]) == 0.0 and float(good["latent_change_inside"]) > 0.1
    assert float(by["cat face"]["identity_arcface"]) < float(good["identity_arcface"]) - 0.2
    assert by["missing file"]["status"] == "error" and "image file not found" in by["missing file"]["errors"]
    broken = next(r for r in rows if r["line"] == "4")
    assert broken["status"] == "error" and "not valid JSON" in broken["errors"]
    mism = by["size mismatch"]
    assert mism["status"] == "partial" and "baseline is 256x256 but the picture is 512x512" in mism["errors"]
    assert mism["identity_arcface"] != "" and mism["psnr_outside"] == ""
    noface = by["no face"]
    assert noface["status"] == "partial" and "no face found" in noface["errors"] and noface["identity_arcface"] == ""
    assert noface["psnr_outside"] == "inf" and float(noface["change_inside"]) == 0.0
    assert "latent context: give both latent and baseline_latent" in noface["errors"]
    doc = _strict_json(d / "evaluation.json")
    assert [r["status"] for r in doc["rows"]] == ["ok", "ok", "error", "error", "partial", "partial"]
    assert doc["rows"][0]["psnr_outside"] == "inf" and doc["rows"][0]["prompt_clip"] is None
    assert doc["mean"]["psnr_outside"] == "inf" and set(doc["metrics"]) >= {"identity_arcface", "psnr_outside"}
    assert "line 3 (missing file): image: image file not found" in proc.stdout and "problems (4 of 6 rows)" in proc.stdout


def test_cli_refuses_a_missing_manifest_and_face_folder(folder, tmp_path):
    from comfyui_moa.moa_attention.evaluation.cli import main
    assert main([str(tmp_path)]) == 2
    d, root = folder
    assert main([str(d), "--face-model", "buffalo_l", "--insightface", str(root)]) == 2


def _text_encoder_file(path: Path, projection: bool) -> Path:
    """The tests' random SD1.5 CLIP-L as a text encoder file (CLIPLoader layout), with or without the projection."""
    from safetensors.torch import save_file
    from support.model_factory import clip_l_state_dict
    prefix = "clip_l.transformer."
    sd = {k[len(prefix):]: v for k, v in clip_l_state_dict().items() if k.startswith(prefix)}
    if not projection:
        sd = {k: v for k, v in sd.items() if k.startswith("text_model.embeddings")}   # the header is all that is read
    else:
        assert "text_projection.weight" in sd
    save_file(sd, str(path))
    return path


def test_cli_clip_numbers_and_a_text_encoder_without_projection(comfy, models_base, folder, tmp_path, capsys):
    from comfyui_moa.moa_attention.evaluation.cli import main
    d, _ = folder
    _, info = models_base
    vision = str(info["clip_vision_path"])
    bare = _text_encoder_file(tmp_path / "sd15_text_encoder.safetensors", projection=False)
    assert main([str(d), "--clip-vision", vision, "--text-encoder", str(bare)]) == 2
    err = capsys.readouterr().err
    assert "has no text projection" in err and "clip-vit-large-patch14" in err
    full = _text_encoder_file(tmp_path / "clip_l_full.safetensors", projection=True)
    out = tmp_path / "clip_eval"
    assert main([str(d), "--manifest", "clip.jsonl", "--clip-vision", vision, "--text-encoder", str(full),
                 "--out", str(out)]) == 1
    print(capsys.readouterr().out)
    rows = {r["label"]: r for r in _strict_json(Path(f"{out}.json"))["rows"]}
    good = rows["good"]
    assert -1 <= good["prompt_clip"] <= 1 and -1 <= good["identity_clip"] <= 1
    assert good["identity_arcface"] is None                            # no --face-model
    assert rows["no face"]["identity_clip"] is not None                # CLIP identity needs no face
    assert rows["missing file"]["prompt_clip"] is None
    assert rows["identical"]["identity_clip"] == pytest.approx(1.0, abs=1e-4)
    assert rows["grey, whole picture"]["identity_clip"] < rows["identical"]["identity_clip"] - 0.05


def test_the_prompt_score_uses_the_files_text_projection(comfy, tmp_path):
    """The text embedding is CLIP's projected EOS embedding, with the projection read from the file."""
    from safetensors import safe_open
    from comfyui_moa.moa_attention.comfyui import clip_scores
    path = _text_encoder_file(tmp_path / "clip_l_full.safetensors", projection=True)
    clip = clip_scores.load_text_encoder(path)
    assert clip_scores.load_text_encoder(path) is clip                              # cached
    with safe_open(str(path), framework="pt") as f:
        w = f.get_tensor("text_projection.weight").float()
    tokens = clip.tokenize("a photo of a man at the beach")
    _, unprojected = clip.encode_from_tokens(tokens, return_pooled="unprojected")
    expected = torch.nn.functional.normalize(unprojected.float()[0] @ w.T, dim=0)
    got = clip_scores.text_embedding(clip, "a photo of a man at the beach")
    assert torch.allclose(got, expected, atol=1e-3), float((got - expected).abs().max())
    # ComfyUI's SD1.5 text encoder returns the pooled output unprojected even for return_pooled=True:
    _, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    assert torch.allclose(pooled, unprojected)
    assert not torch.allclose(got, torch.nn.functional.normalize(pooled.float()[0], dim=0), atol=1e-2)


def test_cli_argument_errors_exit_2(folder, tmp_path, capsys):
    from comfyui_moa.moa_attention.evaluation.cli import main
    d, _ = folder
    assert main([str(d), "--text-encoder", str(tmp_path / "x.safetensors")]) == 2
    assert "--text-encoder needs --clip-vision" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere")]) == 2
