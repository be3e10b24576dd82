"""The trainer learns MoA's disentanglement on a cut-down toy world (experiments/toy_world):
a tiny SD1.5-architecture base trained briefly, an adapter trained briefly with the trainer's own
loop, judged on identities it never saw with numbers a uniform share cannot reach (a share that
is the same everywhere has AUROC 0.5 and changes every pixel alike)."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# A share that is the same everywhere scores AUROC 0.5 and a 1x share ratio, and a collapsed run
# changes the inside about as much as the outside, so these thresholds cannot be met without
# localisation; a passing run's own numbers are in experiments/toy_world/README.md.
MIN_AUROC = 0.85
MIN_SHARE_RATIO = 2.0
MIN_IN_OUT_RATIO = 1.5
# identity: one UNet step on 48 unseen scenes (16 per class, chance 1/16); the x0 estimate inside
# the subject must be nearest to the subject's own reference. A fresh adapter is the base, which
# reads only what the noisy scene still shows: at t=950 that is chance, at t=600 a good part of it.
# Measured numbers in experiments/toy_world/README.md.
BASE_LEVELS, BASE_STEPS = 2, 300
STEPS, BATCH, RANK = 200, 8, 16
RECIPE: dict = {"subject_x0_weight": 1.0, "effect_x0_weight": 1.0}
IDENTITY_TS = (600, 800, 950)        # the noise of each t is drawn in this order
MIN_TOP1_T950 = 0.15
MIN_GAIN_T600 = 0.10


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
    from experiments.toy_world import data, encoder, world
    from experiments.toy_world import run as toy
    from comfyui_moa.moa_attention.comfyui.sampling import alphas_cumprod
    from comfyui_moa.moa_attention.training.config import TrainConfig
    from comfyui_moa.moa_attention.training.loop import train_adapter
    out = tmp_path_factory.mktemp("toy")
    with one_thread():
        # the plain recipe (no EMA, eps loss, Gaussian noise, ComfyUI's GroupNorms): localisation and the
        # one-step identity need a base that knows the context at the noise levels judged, not one that
        # draws from noise
        bcfg = base_mod.BaseConfig(model_channels=32, levels=BASE_LEVELS, middle=False, steps=BASE_STEPS,
                                   batch_size=8, warmup=20, lr=2e-3, ema=0.0, x0_weight_cap=0.0, low_freq_noise=0.0,
                                   norm_groups=32)
        base_mod.train_base(bcfg, out / "base.safetensors", log_every=50)
        model, _ = base_mod.load_base(out / "base.safetensors", "cpu")
        train_ids = world.identities(60, 11)
        train = data.make_examples(train_ids, 2, 12)
        unseen = data.make_examples(world.identities(16, 13), 1, 14)
        cfg = TrainConfig(Path(), Path(), Path(), out / "adapter", rank=RANK, batch_size=BATCH, lr=2e-3, steps=STEPS, seed=0,
                          checkpoint_every=0, log_every=10, device="cpu", eval_examples=len(unseen), **RECIPE)
        assert train_adapter(cfg, model.diffusion_model, alphas_cumprod(model), train, "cpu",
                             eval_examples=unseen) == 0
    centre = torch.stack([encoder.descriptor(*data.reference(i, torch.Generator().manual_seed(k)))
                          for k, i in enumerate(train_ids)]).mean(0)
    # identity is judged on 16 unseen identities per class (chance top-1 1/16)
    return SimpleNamespace(dir=out / "adapter", model=model, cfg=cfg, centre=centre,
                           judged=toy.eval_set("unseen", world.identities(48, 15), 16))


def test_adapter_disentangles_unseen_identities(toy_run):
    """On identities it never saw, the router's share separates the subject from the context
    (AUROC at t <= 600) and the adapter changes the prediction inside the subject several times
    more than outside it (same noisy input, strength 1)."""
    summary = json.loads((toy_run.dir / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    print({k: round(after[k], 4) for k in ("share_auroc", "fg_share", "bg_share", "change_in", "change_out")})
    assert after["share_auroc"] >= MIN_AUROC, summary
    assert after["fg_share"] >= MIN_SHARE_RATIO * after["bg_share"], summary
    assert after["bg_share"] < 0.5, summary                           # hard routing keeps the context
    assert after["change_in"] >= MIN_IN_OUT_RATIO * after["change_out"], summary
    assert after["loss"] < before["loss"], summary
    assert (toy_run.dir / "adapter.safetensors").is_file()


def one_step_identity_top1(run, adapter) -> dict:
    """Top-1 retrieval of the subject's identity from one UNet step's x0 estimate at each of IDENTITY_TS."""
    from comfyui_moa.moa_attention.comfyui.sampling import alphas_cumprod
    from comfyui_moa.moa_attention.engine.layer import install_layers
    from comfyui_moa.moa_attention.training.step import MoATrainStep
    from experiments.toy_world import run as toy
    unet = run.model.diffusion_model
    uninstall = install_layers(unet, adapter)
    try:
        with one_thread():
            step = MoATrainStep(adapter, unet, alphas_cumprod(run.model), run.cfg)
            return toy.one_step_identity(step, run.judged, run.centre, seed=5, ts=IDENTITY_TS)
    finally:
        uninstall()


def identity_met(top1: dict) -> bool:
    """Where the noisy scene shows nothing (t=950) the reference's identity well above chance, and
    where it shows some (t=600) well above what the base reads from it."""
    return (top1["x0_top1_moa_t950"] >= MIN_TOP1_T950
            and top1["x0_top1_moa_t600"] >= top1["x0_top1_base_t600"] + MIN_GAIN_T600)


def test_fresh_adapter_stays_below_the_identity_threshold(toy_run):
    """A fresh adapter (personal expert = prior, fusion = identity on the text) gives the base's
    x0 estimate exactly, so it cannot reach the identity threshold: the threshold measures what
    the reference adds, not what the noisy scene still shows."""
    from comfyui_moa.moa_attention.engine.adapter import init_adapter_from_unet
    fresh = one_step_identity_top1(toy_run, init_adapter_from_unet(toy_run.model.diffusion_model, rank=RANK).eval())
    for t in IDENTITY_TS:
        assert fresh[f"x0_top1_moa_t{t}"] == pytest.approx(fresh[f"x0_top1_base_t{t}"], abs=1 / 48), fresh
    assert not identity_met(fresh), fresh


def test_adapter_carries_the_identity_of_unseen_subjects(toy_run):
    """MoA's x0 estimate inside the subject is nearest to the subject's own reference among its
    class's 16 well above chance (1/16) where the noisy scene shows nothing, and well above the
    base, which has only what the noisy scene shows, where it shows some."""
    from comfyui_moa.moa_attention.engine.adapter_file import load_adapter
    trained = one_step_identity_top1(toy_run, load_adapter(toy_run.dir / "adapter.safetensors").eval())
    print(trained)
    assert identity_met(trained), trained


def test_experiment_command_reports_every_target_and_reuses_its_base(comfy, tmp_path, capsys):
    """The experiment's one command (its README) with two adapter seeds, cut to seconds: it trains
    and caches the base, trains each seed's adapter, evaluates unseen and seen identities and writes
    the tables, results, grids and the summary with the spread; diagnose.py then reuses the cached
    base (its config read from the file) instead of training it again, and refuses a missing one."""
    from experiments.toy_world import diagnose
    from experiments.toy_world import run as toy
    from PIL import Image
    base = ["--base-file", str(tmp_path / "base.safetensors"), "--train-identities", "6",
            "--eval-identities", "6", "--sample-steps", "3", "--threads", "1"]
    with one_thread():
        assert toy.main(base + ["--base-steps", "10", "--out", str(tmp_path / "seeds"), "--adapter-seeds", "2",
                                "--steps", "4", "--batch-size", "4", "--scenes-per-identity", "1",
                                "--swap-steps", "3", "--swap-refine", "1", "--swap-cfg", "3"]) == 0
        first = capsys.readouterr().out
        # the colour / pattern / rim diagnosis of seed 0's adapter, on the same base and identities
        assert diagnose.main(base + ["--adapter-dir", str(tmp_path / "seeds" / "seed0" / "adapter"),
                                     "--out", str(tmp_path / "d.json")]) == 0
        again = capsys.readouterr().out
        # without the adapter's base there is nothing to diagnose against: say which option, not train one
        missing = tmp_path / "missing.safetensors"
        with pytest.raises(SystemExit):
            diagnose.main(["--base-file", str(missing), "--adapter-dir", str(tmp_path / "seeds" / "seed0" / "adapter")])
        assert f"--base-file {missing}: no base model there" in capsys.readouterr().err
        assert not missing.exists()
    assert first.count("training the base model (10 steps)") == 1, first
    assert "reusing the base model" in again and "training the base model" not in again, again
    run = tmp_path / "seeds" / "seed0"
    results = json.loads((run / "results.json").read_text())
    for name in ("unseen", "seen"):
        r = results[name]
        for lo, hi in toy.T_RANGES:
            assert 0.0 <= r[f"auroc_t{lo}_{hi}"] <= 1.0, r
        assert r["step_change_in"] > 0 and r["step_change_out"] > 0, r
        # a 10-step base draws no clean background, so "outside the subject" may be empty (NaN)
        for key in ("change_in", "change_out", "context_ratio", "soft_top1", "hard_top1", "base_top1",
                    "soft_mean_rank", "soft_cosine", "soft_found", "soft_vs_hard_in", "x0_top1_moa_t800"):
            assert isinstance(r[key], float), (name, key, r[key])
        assert 1.0 <= r["soft_mean_rank"] <= 16.0 and 0.0 <= r["soft_top1"] <= 1.0, r
    for key in ("swap_change_in", "swap_soft_new_top1", "swap_soft_old_top1", "swap_base_old_top1",
                "swap_base_reconstruction_error", "swap_photo_change_out"):
        assert isinstance(results["unseen"][key], float), (key, results["unseen"][key])
    table = (run / "table.md").read_text()
    assert table.count("| unseen") == 4 and table.count("| seen") == 3 and "old identity top-1" in table
    grid = Image.open(run / "grid.png")
    assert grid.size == (2 + 5 * (16 * 8 + 2), 2 + 6 * (16 * 8 + 2))  # 6 identities x (ref, base, MoA, map, hard)
    assert Image.open(run / "grid_swap.png").size[0] == 2 + 6 * (16 * 8 + 2)
    assert results["train_summary"]["steps"] == 4
    assert (tmp_path / "seeds" / "seed1" / "grid.png").is_file()
    summary = json.loads((tmp_path / "seeds" / "summary.json").read_text())
    assert len(summary["soft_top1"]["values"]) == 2 and summary["soft_top1"]["std"] >= 0.0, summary
    assert "mean ± std" in (tmp_path / "seeds" / "summary.md").read_text()
    diagnosis = json.loads((tmp_path / "d.json").read_text())
    for key in ("as_judged", "right_pattern", "right_colours", "eroded_core", "found", "split_alignment",
                "base_found", "base_split_alignment"):
        assert 0.0 <= diagnosis[key] <= 1.0, diagnosis
    assert diagnosis["midpoint_error"] >= 0 and diagnosis["split_ratio"] >= 0, diagnosis
    for t in diagnose.SPLIT_TS:
        assert 0.0 <= diagnosis[f"x0_split_alignment_moa_t{t}"] <= 1.0, diagnosis
        # the posterior mean between the two true colours lies on the segment between them
        assert diagnosis[f"x0_split_alignment_oracle_t{t}"] > 0.99, diagnosis
    # the noisy input read as it is: its colours drown in the noise as t grows, where knowing the
    # two colours keeps the estimate near them
    assert diagnosis["x0_midpoint_error_input_t200"] < 0.5 * diagnosis["x0_midpoint_error_input_t950"], diagnosis
    assert diagnosis["x0_midpoint_error_oracle_t950"] < 0.5 * diagnosis["x0_midpoint_error_input_t950"], diagnosis
    # the same pictures as the run's txt2img (identities, noise, sampling): the judge's own top-1
    assert diagnosis["as_judged"] == pytest.approx(results["unseen"]["soft_top1"]), (diagnosis, results["unseen"])
    assert diagnosis["true_object_pixels"] > 4, diagnosis


def test_colour_split_separates_the_hue_from_the_split_axis():
    """diagnose.colour_split: the true colours themselves (either cluster order) miss nothing; a
    pair with the right midpoint split along an orthogonal axis has the midpoint and the split
    length right and the split's alignment 0."""
    from experiments.toy_world.diagnose import colour_split
    a, b = torch.tensor([2.0, 0, 0, 0]), torch.tensor([0.0, 2, 0, 0])
    true, pattern = torch.stack([a, b]), torch.tensor([1.0, 0.0])
    for drawn in (torch.cat([a, b, pattern]), torch.cat([b, a, pattern])):
        assert colour_split(drawn, true) == pytest.approx({"midpoint_error": 0, "split_ratio": 1, "split_alignment": 1})
    mid, ortho = (a + b) / 2, torch.tensor([0.0, 0, 2 ** 0.5, 0])
    off_axis = torch.cat([mid - ortho, mid + ortho, pattern])
    assert colour_split(off_axis, true) == pytest.approx({"midpoint_error": 0, "split_ratio": 1, "split_alignment": 0},
                                                         abs=1e-6)
    assert colour_split(torch.cat([a + 1, b + 1, pattern]), true)["midpoint_error"] == pytest.approx(2.0)


def test_posterior_mean_is_the_nearer_colour_when_the_noise_is_small_and_the_midpoint_when_it_is_large():
    """diagnose.posterior_mean, the one-step oracle: each pixel's own colour at t near 0, the two
    colours' midpoint at pure noise."""
    from experiments.toy_world.diagnose import posterior_mean
    a, b = torch.tensor([2.0, 0, 0, 0]), torch.tensor([0.0, 2, 0, 0])
    pairs = torch.stack([a, b])[None]                                   # one scene
    x0 = torch.stack([a, b], dim=1).view(1, 4, 1, 2)                    # pixel 0 colour a, pixel 1 colour b
    clean = posterior_mean(0.999 ** 0.5 * x0, pairs, torch.tensor(0.999))
    assert torch.allclose(clean, x0, atol=1e-4), clean
    noisy = posterior_mean(0.001 ** 0.5 * x0, pairs, torch.tensor(0.001))
    assert torch.allclose(noisy, ((a + b) / 2).view(1, 4, 1, 1).expand(1, 4, 1, 2), atol=0.01), noisy


def test_block_noise_stays_only_at_and_above_its_first_timestep():
    """base.plain_below: rows at t >= min_t keep the block noise bit for bit; the rows below get
    fresh plain noise, whose 4x4-block means are those of white noise (std 1/4, where the block
    noise's are about 0.5); min_t 0 returns the noise untouched and draws nothing."""
    from experiments.toy_world import base as base_mod
    g = torch.Generator().manual_seed(0)
    blocks = base_mod.training_noise((64, 4, 16, 16), g, 0.3)
    t = torch.tensor([900, 100] * 32)
    state = g.get_state()
    assert base_mod.plain_below(blocks, t, 0, g) is blocks and torch.equal(g.get_state(), state)
    mixed = base_mod.plain_below(blocks, t, 500, g)
    assert torch.equal(mixed[0::2], blocks[0::2])

    def block_std(x: torch.Tensor) -> float:
        return float(torch.nn.functional.avg_pool2d(x, 4).std())
    assert block_std(blocks) > 0.4 and block_std(mixed[1::2]) == pytest.approx(0.25, abs=0.03)
    assert float(mixed[1::2].std()) == pytest.approx(1.0, abs=0.03)


def _cached_base(path: Path, config: dict) -> Path:
    """A stand-in base file: one weight and the config metadata a cached base carries."""
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(path), metadata={"config": json.dumps(config)})
    return path


def test_a_cached_base_naming_a_retired_option_is_reused_only_if_it_trained_as_now(tmp_path):
    """Cached bases of older versions name min_snr_gamma: at 0 (off) the file is today's config and
    the run reuses it; at another value it matches no config (the run trains a new base), and
    loading it directly says what to do."""
    from dataclasses import asdict

    from experiments.toy_world import base as base_mod
    cfg = base_mod.BaseConfig(steps=30)
    for gamma, expected in ((0.0, cfg), (5.0, None)):
        path = _cached_base(tmp_path / f"base_{gamma}.safetensors", {**asdict(cfg), "min_snr_gamma": gamma})
        assert base_mod.cached_config(path) == expected
    with pytest.raises(ValueError, match=r"min_snr_gamma.*train it again"):
        base_mod.load_base(path, "cpu")
    assert base_mod.cached_config(tmp_path / "missing.safetensors") is None


def test_a_cached_base_older_than_an_option_reads_as_trained_without_it(tmp_path):
    """A base file written before low_freq_min_t and norm_groups existed trained with block noise
    at every timestep and ComfyUI's 32 GroupNorm groups: it reads as such, which is not the
    current default, so the run trains a new base instead of reusing it under the wrong name."""
    from dataclasses import asdict

    from experiments.toy_world import base as base_mod
    old = asdict(base_mod.BaseConfig())
    del old["low_freq_min_t"], old["norm_groups"]
    path = _cached_base(tmp_path / "old.safetensors", old)
    assert base_mod.cached_config(path) == base_mod.BaseConfig(low_freq_min_t=0, norm_groups=32)
    assert base_mod.cached_config(path) != base_mod.BaseConfig()


def test_the_base_is_built_saved_and_loaded_with_its_norm_groups(comfy, tmp_path):
    """ComfyUI's UNet builds every GroupNorm of the base with norm_groups groups (its custom
    operations hook), the file records the number and a loaded base has them again; the same
    weights in ComfyUI's default 32 groups compute another prediction, so the option is used."""
    from dataclasses import replace

    from experiments.toy_world import base as base_mod
    from experiments.toy_world import world

    def groups(model) -> set[int]:
        return {m.num_groups for m in model.diffusion_model.modules() if isinstance(m, torch.nn.GroupNorm)}

    cfg = base_mod.BaseConfig(levels=1, middle=False, steps=2, batch_size=2, warmup=1)
    assert cfg.norm_groups == 4
    with one_thread():
        path = base_mod.train_base(cfg, tmp_path / "base.safetensors", log_every=1)
        loaded, stored = base_mod.load_base(path, "cpu")
        assert stored == cfg and groups(loaded) == {4}
        torch.nn.init.normal_(loaded.diffusion_model.out[-1].weight, generator=torch.Generator().manual_seed(1))
        ungrouped = base_mod.build_model(replace(cfg, norm_groups=32), "cpu")
        ungrouped.diffusion_model.load_state_dict(loaded.diffusion_model.state_dict())
        assert groups(ungrouped) == {32}
        x = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
        ctx = torch.stack([world.embed(world.caption_tokens("ball", "beach"))])
        t = torch.tensor([500.0])
        with torch.no_grad():
            a, b = (m.diffusion_model(x, t, context=ctx) for m in (loaded, ungrouped))
    assert float((a - b).abs().max()) > 1e-3
