"""The evaluation numbers in plain torch: SSIM, masked PSNR/SSIM, context preservation, router
shares, how the report writes them (inf stays inf) and per-metric errors in the scoring."""
from __future__ import annotations

import json
import math

import pytest
import torch


def test_ssim_matches_scikit_image_and_is_one_for_identical_images():
    skm = pytest.importorskip("skimage.metrics")
    from comfyui_moa.moa_attention.scoring.metrics import ssim
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 64, 64, 3, generator=g)
    b = (a + 0.08 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    ref = skm.structural_similarity(a[0].numpy(), b[0].numpy(), channel_axis=2, data_range=1.0,
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ssim(a, b) == pytest.approx(float(ref), abs=2e-3)      # borders: reflect-padded here, cropped there
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a[:, :5, :5], b[:, :5, :5]) < 1.0                  # smaller than the window still works


def test_context_preservation_inside_vs_outside():
    from comfyui_moa.moa_attention.scoring.metrics import context_preservation
    g = torch.Generator().manual_seed(1)
    base = torch.rand(1, 32, 32, 3, generator=g)
    mask = torch.zeros(32, 32)
    mask[8:24, 8:24] = 1
    same = context_preservation(base, base.clone(), mask)
    assert (same.change_inside, same.change_outside) == (0.0, 0.0)
    assert same.psnr_outside == math.inf and same.psnr_inside == math.inf and same.ssim_outside == pytest.approx(1.0)
    edited = base.clone()
    edited[:, 8:24, 8:24] = torch.rand(1, 16, 16, 3, generator=g)
    s = context_preservation(base, edited, mask)
    assert s.change_inside > 0.2 and s.change_outside == 0.0 and s.psnr_outside == math.inf and s.psnr_inside < 15
    assert s.ssim_inside < 0.5 and s.ssim_outside == pytest.approx(1.0)   # the subject does not leak into it
    lat = context_preservation(torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8), torch.ones(8, 8), peak=None)
    assert lat.change_inside == 1.0 and math.isnan(lat.change_outside) and math.isnan(lat.psnr_inside)


def test_router_shares():
    from comfyui_moa.moa_attention.scoring.metrics import router_shares
    mask = torch.zeros(64, 64)
    mask[:, :32] = 1
    share = torch.zeros(8, 8)
    share[:, :4] = 0.9
    share[:, 4:] = 0.1
    r = router_shares(share, mask)                                  # the mask is resized to the share
    assert r.subject_share == pytest.approx(0.9) and r.background_share == pytest.approx(0.1) and r.auroc == 1.0


def test_report_writes_inf_as_inf_and_nan_as_missing():
    from comfyui_moa.moa_attention.scoring import report
    assert report.format_value(math.inf) == "inf" and report.format_value(float("nan")) == "n/a"
    assert report.csv_value(math.inf) == "inf" and report.csv_value(float("nan")) == ""
    assert json.dumps([report.json_value(math.inf), report.json_value(float("nan"))]) == '["inf", null]'
    rows = [{"label": "a", "psnr_outside": math.inf, "change_outside": 0.0},
            {"label": "b", "psnr_outside": 30.0, "change_outside": 0.01}]
    text = report.text_table(rows)
    assert "inf" in text.splitlines()[1] and "mean" in text and "PSNR out" in text and "id ArcFace" not in text
    assert report.mean_of([math.inf, 30.0]) == math.inf and math.isnan(report.mean_of([None, float("nan")]))


def test_grid_and_difference_image():
    from comfyui_moa.moa_attention.scoring.report import comparison_grid, difference_image
    a = torch.zeros(40, 60, 3)
    b = a.clone()
    b[10:20, 10:20] = 1
    mask = torch.zeros(40, 60)
    mask[5:25, 5:25] = 1
    d = difference_image(a, b, mask)
    assert d.shape == (40, 60, 3) and float(d[15, 15].min()) == 1.0 and float(d[35, 50].max()) == 0.0
    assert torch.allclose(d[5, 15], torch.tensor([0.1, 0.9, 0.2]))                 # the mask's outline
    grid = comparison_grid([[a, None, d], [b]], tile=32, gap=2)
    assert grid.shape == (1, 2 * 32 + 3 * 2, 3 * 32 + 4 * 2, 3)


def test_scoring_computes_what_it_can_and_names_what_it_cannot():
    from comfyui_moa.moa_attention.scoring.evaluator import Evaluator, Picture
    calls = []

    def face(image, box, label):
        calls.append(label)
        if float(image.mean()) < 0.01:
            raise ValueError(f"{label}: no face found")
        return torch.tensor([1.0, 0.0]) if float(image.mean()) > 0.4 else torch.tensor([0.6, 0.8])

    ev = Evaluator(face_embedding=face, prompt_score=lambda image, prompt: 0.25)
    img = torch.full((16, 16, 3), 0.5)
    refs = torch.full((2, 16, 16, 3), 0.5)
    mask = torch.zeros(16, 16)
    mask[4:12, 4:12] = 1
    ok = ev.score(Picture(img, baseline=img.clone(), mask=mask, router_map=mask * 0.8, prompt="a man",
                          references=refs, reference_key="r"))
    assert ok["errors"] == [] and ok["identity_arcface"] == pytest.approx(1.0) and ok["prompt_clip"] == 0.25
    assert ok["psnr_outside"] == math.inf and ok["router_background_share"] == 0.0 and ok["router_auroc"] == 1.0
    other = ev.score(Picture(torch.full((16, 16, 3), 0.3), references=refs, reference_key="r",
                             baseline=torch.zeros(8, 8, 3), mask=mask))
    assert other["identity_arcface"] == pytest.approx(0.6)
    assert calls.count("reference 1") == 1                          # the reference embedding is cached by key
    assert any("baseline is 8x8 but the picture is 16x16" in e for e in other["errors"])
    dark = ev.score(Picture(torch.zeros(16, 16, 3), references=refs, reference_key="r", baseline=torch.zeros(16, 16, 3),
                            mask=torch.ones(8, 8)))
    assert math.isnan(dark["identity_arcface"]) and "identity (ArcFace): picture: no face found" in dark["errors"]
    assert any(e.startswith("mask: its size 8x8 differs") for e in dark["errors"])
    assert any("needs the subject mask" in e for e in dark["errors"])
