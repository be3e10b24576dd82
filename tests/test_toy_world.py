"""The trainer learns MoA's disentanglement on a cut-down toy world (experiments/toy_world):
a tiny SD1.5-architecture base trained briefly, an adapter trained briefly with the trainer's own
loop, judged on identities it never saw with numbers a uniform share cannot reach (a share that
is the same everywhere has AUROC 0.5 and changes every pixel alike)."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# A share that is the same everywhere scores AUROC 0.5 and a 1x share ratio, and a collapsed run
# changes the inside about as much as the outside, so these thresholds cannot be met without
# localisation; a passing run's own numbers are in experiments/toy_world/README.md.
MIN_AUROC = 0.85
MIN_SHARE_RATIO = 2.0
MIN_IN_OUT_RATIO = 1.5


@contextmanager
def one_thread():
    """One torch thread (on cores other jobs share, more threads wait on each other), then the
    process's own count again: the toy world's code and its main() set it process-wide."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_run(comfy, tmp_path_factory):
    from experiments.toy_world import base as base_mod
    from experiments.toy_world import data, world
    from comfyui_moa.moa_attention.comfyui.sampling import alphas_cumprod
    from comfyui_moa.moa_attention.training.config import TrainConfig
    from comfyui_moa.moa_attention.training.loop import train_adapter
    out = tmp_path_factory.mktemp("toy")
    with one_thread():
        # the plain recipe (no EMA, eps loss, Gaussian noise): localisation needs a base that knows
        # the context at t <= 600, not one that draws scenes from noise
        bcfg = base_mod.BaseConfig(model_channels=32, levels=1, middle=False, steps=150, batch_size=8, warmup=20,
                                   lr=2e-3, ema=0.0, x0_weight_cap=0.0, low_freq_noise=0.0)
        base_mod.train_base(bcfg, out / "base.safetensors", log_every=50)
        model, _ = base_mod.load_base(out / "base.safetensors", "cpu")
        train = data.make_examples(world.identities(60, 11), 2, 12)
        unseen = data.make_examples(world.identities(16, 13), 1, 14)
        cfg = TrainConfig(Path(), Path(), Path(), out / "adapter", rank=8, batch_size=4, lr=2e-3, steps=100, seed=0,
                          checkpoint_every=0, log_every=10, device="cpu", eval_examples=len(unseen))
        assert train_adapter(cfg, model.diffusion_model, alphas_cumprod(model), train, "cpu",
                             eval_examples=unseen) == 0
    return out / "adapter"


def test_adapter_disentangles_unseen_identities(toy_run):
    """On identities it never saw, the router's share separates the subject from the context
    (AUROC at t <= 600) and the adapter changes the prediction inside the subject several times
    more than outside it (same noisy input, strength 1)."""
    summary = json.loads((toy_run / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    print({k: round(after[k], 4) for k in ("share_auroc", "fg_share", "bg_share", "change_in", "change_out")})
    assert after["share_auroc"] >= MIN_AUROC, summary
    assert after["fg_share"] >= MIN_SHARE_RATIO * after["bg_share"], summary
    assert after["bg_share"] < 0.5, summary                           # hard routing keeps the context
    assert after["change_in"] >= MIN_IN_OUT_RATIO * after["change_out"], summary
    assert after["loss"] < before["loss"], summary
    assert (toy_run / "adapter.safetensors").is_file()


def test_experiment_command_reports_every_target_and_reuses_its_base(comfy, tmp_path, capsys):
    """The experiment's one command (its README), cut to seconds: it trains and caches the base,
    trains the adapter, evaluates unseen and seen identities and writes the table, results and
    grids; a second run with the same base config reuses the cached file instead of training it again."""
    from experiments.toy_world import run as toy
    from PIL import Image
    args = ["--out", str(tmp_path / "run"), "--base-file", str(tmp_path / "base.safetensors"), "--threads", "1",
            "--base-steps", "10", "--steps", "4", "--batch-size", "4", "--train-identities", "6",
            "--scenes-per-identity", "1", "--eval-identities", "6", "--sample-steps", "3"]
    with one_thread():
        assert toy.main(args) == 0
        first = capsys.readouterr().out
        assert toy.main(args) == 0
        again = capsys.readouterr().out
    assert "training the base model (10 steps)" in first
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for name in ("unseen", "seen"):
        r = results[name]
        for lo, hi in toy.T_RANGES:
            assert 0.0 <= r[f"auroc_t{lo}_{hi}"] <= 1.0, r
        assert r["step_change_in"] > 0 and r["step_change_out"] > 0, r
        # a 10-step base draws no clean background, so "outside the subject" may be empty (NaN)
        for key in ("sample_change_in", "sample_change_out", "id_moa", "id_hard", "id_base", "id_mismatched",
                    "objects_found_moa", "soft_vs_hard_in", "swap_sample_change_in", "swap_id_moa"):
            assert isinstance(r[key], float), (name, key, r[key])
    table = (tmp_path / "run" / "table.md").read_text()
    assert table.count("| unseen") == 3 and table.count("| seen") == 3 and "swap from t=600" in table
    grid = Image.open(tmp_path / "run" / "grid.png")
    assert grid.size == (2 + 5 * (16 * 8 + 2), 2 + 6 * (16 * 8 + 2))  # 6 identities x (ref, base, MoA, map, hard)
    assert Image.open(tmp_path / "run" / "grid_swap.png").size[0] == 2 + 6 * (16 * 8 + 2)
    assert results["train_summary"]["steps"] == 4
    assert "reusing the base model" in again and "training the base model" not in again


def test_a_cached_base_naming_a_retired_option_is_reused_only_if_it_trained_as_now(tmp_path):
    """Cached bases of older versions name min_snr_gamma: at 0 (off) the file is today's config and
    the run reuses it; at another value it matches no config (the run trains a new base), and
    loading it directly says what to do."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    from experiments.toy_world import base as base_mod
    cfg = base_mod.BaseConfig(steps=30)
    for gamma, expected in ((0.0, cfg), (5.0, None)):
        path = tmp_path / f"base_{gamma}.safetensors"
        meta = {"config": json.dumps({**asdict(cfg), "min_snr_gamma": gamma})}
        save_file({"w": torch.zeros(1)}, str(path), metadata=meta)
        assert base_mod.cached_config(path) == expected
    with pytest.raises(ValueError, match=r"min_snr_gamma.*train it again"):
        base_mod.load_base(path, "cpu")
    assert base_mod.cached_config(tmp_path / "missing.safetensors") is None
