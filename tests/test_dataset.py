"""The training-dataset validator: every bad row reported with its line number."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from support.datasets import write_dataset
from support.waits import minutes

ROOT = Path(__file__).resolve().parents[1]


def test_a_good_dataset_has_no_problems(tmp_path):
    from comfyui_moa.moa_attention.training.dataset import read_manifest
    records, problems = read_manifest(write_dataset(tmp_path, n=3))
    assert problems == []
    assert [r.line for r in records] == [1, 2, 3]
    assert [s.class_word for s in records[1].subjects] == ["dog", "cat"]


def test_each_bad_row_is_reported_with_its_line(tmp_path):
    from comfyui_moa.moa_attention.training.dataset import read_manifest
    root = write_dataset(tmp_path, n=1, two_subjects_every=0)
    good = json.loads((root / "manifest.jsonl").read_text().splitlines()[0])
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "masks" / "small.png")
    (root / "images" / "broken.png").write_bytes(b"not a png at all")

    def variant(**changes):
        row = json.loads(json.dumps(good))
        for key, value in changes.items():
            if key.startswith("s_"):
                row["subjects"][0][key[2:]] = value
            else:
                row[key] = value
        return json.dumps(row)

    lines = [
        json.dumps(good),                                            # 1 fine
        variant(image="images/missing.png"),                         # 2 missing file
        variant(s_mask="masks/small.png"),                           # 3 mask size mismatch
        variant(caption="a photo of a horse"),                       # 4 class word not in caption
        variant(image="images/broken.png"),                          # 5 unreadable image
        "{not json",                                                 # 6 invalid JSON
        variant(s_references=["refs/nope.png"]),                     # 7 missing reference
        "",                                                          # (blank lines are skipped)
        variant(subjects=[]),                                        # 9 no subjects
    ]
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    records, problems = read_manifest(root)
    assert [r.line for r in records] == [1]
    found = {(p.line, p.message.split(":")[0]) for p in problems}
    by_line = {p.line: p.message for p in problems}
    assert "missing file images/missing.png" in by_line[2]
    assert "size 32x32 differs from image size 64x64" in by_line[3]
    assert "class word 'dog' not in caption" in by_line[4]
    assert "unreadable image images/broken.png" in by_line[5]
    assert "not valid JSON" in by_line[6]
    assert "missing file refs/nope.png" in by_line[7]
    assert "subjects: expected a non-empty list" in by_line[9]
    assert len(found) == 7


def test_validator_command_lists_problems_and_fails(tmp_path):
    root = write_dataset(tmp_path, n=2)
    (root / "manifest.jsonl").write_text((root / "manifest.jsonl").read_text() + '{"image": 3}\n')
    proc = subprocess.run([sys.executable, "-m", "moa_attention.training.dataset", str(root)], cwd=ROOT,
                          capture_output=True, text=True, timeout=minutes(5))
    assert proc.returncode == 1
    assert "line 3: caption: missing or empty" in proc.stdout
    assert "line 3: image: expected a relative file path, got 3" in proc.stdout
    assert "2 good row(s)" in proc.stdout
    ok = subprocess.run([sys.executable, "-m", "moa_attention.training.dataset", str(write_dataset(tmp_path / "ok", n=1))],
                        cwd=ROOT, capture_output=True, text=True, timeout=minutes(5))
    assert ok.returncode == 0 and "0 problem(s)" in ok.stdout
