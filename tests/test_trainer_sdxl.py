"""The trainer on SDXL, through the command line's run as test_trainer.py trains SD1.5.

--base is a checkpoint file ComfyUI's loader detects as SDXL (support.model_factory: a 320-channel
UNet with SDXL's transformer depths, SDXL's full-size text encoders, a TAESD VAE; built once
into the test cache). Checked: `y` made by ComfyUI's conditioning code and cached with the
latents, the loss falling on the fixed evaluation batch, the share's AUROC logged, checkpoints,
--resume, samples through ComfyUI's sampler mid-run, and the adapter in MoA Apply on that model."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from support.datasets import write_dataset
from support.trainer_cli import check_resume_reproduces, log_rows, run_in_process, train_args

PROMPT = "a photo of a dog on the grass"


@pytest.fixture(scope="module")
def sdxl_env(models_base, tmp_path_factory):
    from support.model_factory import write_tiny_sdxl_checkpoint
    _, info = models_base
    cache = tmp_path_factory.mktemp("encoded_cache")
    os.environ["MOA_CACHE_DIR"] = str(cache)        # this module's runs share one encode cache
    return {"ckpt": write_tiny_sdxl_checkpoint(tmp_path_factory.mktemp("sdxl") / "tiny_sdxl.safetensors"),
            "clip_vision": info["clip_vision_path"], "data": write_dataset(tmp_path_factory.mktemp("data"), n=2),
            "cache": cache}


@pytest.fixture(scope="module")
def trained(sdxl_env, tmp_path_factory, comfy):
    out = tmp_path_factory.mktemp("run") / "sdxl_run"
    assert run_in_process(train_args(sdxl_env, out, "--steps", "6", "--checkpoint-every", "3", "--sample-every", "3",
                                     "--sample-steps", "2")) == 0
    return out


@pytest.fixture(scope="module")
def sdxl_checkpoint(sdxl_env, comfy):
    import comfy.sd
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(sdxl_env["ckpt"]), output_vae=True,
                                                              output_clip=True)
    return model, clip


def test_the_checkpoint_file_loads_as_sdxl(sdxl_checkpoint):
    from comfyui_moa.moa_attention.comfyui.models import check_training_base, text_streams
    from comfyui_moa.moa_attention.engine import bases
    model, clip = sdxl_checkpoint
    assert check_training_base(model) is bases.SDXL
    assert text_streams(clip) == {"l": 768, "g": 1280}


def test_sdxl_training_lowers_the_loss_and_logs_the_share_auroc(trained):
    from comfyui_moa.moa_attention.engine.adapter_file import read_adapter_metadata
    summary = json.loads((trained / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["loss"] < before["loss"], summary
    assert before["change_in"] == before["change_out"] == 0.0, before        # a fresh adapter is the base model
    assert after["share_auroc"] == after["share_auroc"], after                # computed, not NaN
    rows = log_rows(trained)
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert all(0.0 <= float(r["share_auroc"]) <= 1.0 for r in rows), rows
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["step_000003", "step_000006"]
    meta = read_adapter_metadata(trained / "adapter.safetensors")
    assert (meta["moa.base"], meta["moa.text_dim"], meta["moa.image_encoder"]) == ("sdxl", "2048", "clip_vit_l14")
    assert json.loads(meta["moa.training"])["resolution"] == "64"


def test_samples_mid_run_come_from_comfyuis_sampler(trained):
    import numpy as np
    from PIL import Image
    for step in (3, 6):
        image = np.asarray(Image.open(trained / "samples" / f"step_{step:06d}.png"))
        assert image.shape == (64, 64, 3) and image.std() > 0, step


def test_y_is_comfyuis_and_cached_with_the_latents(trained, sdxl_env, sdxl_checkpoint):
    """Each example's `y` is what SDXL's encode_adm makes of its pooled prompt at the training
    size (64 px, no crop), and not what it makes at another size."""
    from comfyui_moa.moa_attention.training.cache import load_example
    model, _ = sdxl_checkpoint
    examples = [load_example(p) for p in sorted((sdxl_env["cache"] / "encoded").glob("*.safetensors"))]
    assert len(examples) == 2
    for e in examples:
        assert e.text.shape == (77, 2048) and e.y.shape == (2816,) and e.pooled.shape == (1280,)
        want = model.model.encode_adm(pooled_output=e.pooled[None], width=64, height=64)[0]
        assert torch.allclose(e.y, want.float(), atol=1e-6)
        other = model.model.encode_adm(pooled_output=e.pooled[None], width=1024, height=1024)[0]
        assert (e.y[1280:] - other[1280:].float()).abs().max() > 0.1


def test_sdxl_resume_continues_the_same_run(sdxl_env, trained, tmp_path):
    check_resume_reproduces(sdxl_env, trained, tmp_path / "resumed", steps=6, every=3)


def test_the_trained_adapter_runs_in_moa_apply_on_the_sdxl_model(comfy, trained, sdxl_checkpoint, tiny_vision):
    from comfyui_moa.moa_attention.comfyui.adapters import LoadedAdapter
    from comfyui_moa.moa_attention.engine.adapter_file import load_adapter
    from comfyui_moa.nodes.apply import MoAApply
    from comfyui_moa.nodes.subject import MoASubject
    nodes = comfy[0]
    model, clip = sdxl_checkpoint
    adapter = LoadedAdapter(load_adapter(trained / "adapter.safetensors"), "adapter.safetensors")
    subjects = MoASubject().build(torch.rand(1, 64, 64, 3), "dog", mask=torch.ones(1, 64, 64))[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]

    def sample(strength: float | None) -> torch.Tensor:
        if strength is None:
            patched, positive = model, nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
        else:
            patched, positive = MoAApply().apply(model, adapter, clip, tiny_vision, subjects, PROMPT, strength, 0.0,
                                                 1.0, "soft")
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        return nodes.common_ksampler(patched, 5, 2, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]
    base, moa = sample(None), sample(1.0)
    assert torch.equal(sample(0.0), base)
    assert torch.isfinite(moa).all() and not torch.equal(moa, base)


def test_the_resolution_defaults_to_the_bases(pack):
    from comfyui_moa.moa_attention.engine import bases
    from comfyui_moa.moa_attention.training.cli import parse_args
    from comfyui_moa.moa_attention.training.config import at_base_resolution
    required = ["--base", "b", "--clip-vision", "c", "--data", "d", "--output-dir", "o"]
    cfg = parse_args(required)
    assert cfg.resolution is None
    assert at_base_resolution(cfg, bases.SDXL.resolution).resolution == 1024
    assert at_base_resolution(cfg, bases.SD15.resolution).resolution == 512
    assert at_base_resolution(parse_args(required + ["--resolution", "768"]), bases.SDXL.resolution).resolution == 768
