"""The base-model registry (engine/bases.py) and the refusals it drives: SD1.5 and SDXL models,
text encoders and adapters that do not belong together, the SDXL refiner, and image encoders of
another width than the adapter's, in MoA Apply and in the trainer. The SDXL-shaped models are
built in-process by ComfyUI's own SDXL classes (tests/support/model_factory.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ADAPTER_NAME = "subject_sd15.safetensors"


@pytest.fixture(scope="module")
def refiner_model(comfy):
    from support.model_factory import build_sdxl_model_patcher, tiny_sdxl_unet_config
    return build_sdxl_model_patcher(tiny_sdxl_unet_config(refiner=True))


@pytest.fixture(scope="module")
def clips(comfy, sdxl_clip):
    from support.model_factory import build_tiny_clip
    return {"sd15": build_tiny_clip("sd15"), "sdxl": sdxl_clip, "sdxl_refiner": build_tiny_clip("sdxl_refiner")}


@pytest.fixture(scope="module")
def vision(comfy, tiny_vision):
    from support.model_factory import build_tiny_clip_vision
    return {"vitl": tiny_vision,
            "vith": build_tiny_clip_vision("clip_vision_config_h.json"),
            "vitl336": build_tiny_clip_vision("clip_vision_config_vitl_336.json")}


@pytest.fixture
def sd15_adapter(tiny_model):
    from comfyui_moa.moa_attention.comfyui.adapters import LoadedAdapter
    from comfyui_moa.moa_attention.engine.adapter import init_adapter_from_unet
    return LoadedAdapter(init_adapter_from_unet(tiny_model.get_model_object("diffusion_model"), rank=2), ADAPTER_NAME)


@pytest.fixture(scope="module")
def subjects(comfy):
    from comfyui_moa.nodes.subject import MoASubject
    return MoASubject().build(torch.rand(1, 64, 64, 3), "man", mask=torch.ones(1, 64, 64))[0]


def apply(model, adapter, clip, clip_vision, subjects):
    """MoA Apply as a graph runs it; the base checks come before anything touches clip_vision."""
    from comfyui_moa.nodes.apply import MoAApply
    return MoAApply().apply(model, adapter, clip, clip_vision, subjects, "a photo of a man", 1.0, 0.0, 1.0, "soft")


# --------------------------------------------------------------------------- the registry

def test_registry_holds_each_bases_widths_and_resolution(pack):
    from comfyui_moa.moa_attention.engine import bases
    assert list(bases.BASES) == ["sd15", "sdxl"]
    assert (dict(bases.SD15.text_streams), bases.SD15.context_dim, bases.SD15.y_dim) == ({"l": 768}, 768, None)
    assert (dict(bases.SDXL.text_streams), bases.SDXL.context_dim, bases.SDXL.y_dim) == (
        {"l": 768, "g": 1280}, 2048, 2816)
    assert (bases.SD15.resolution, bases.SDXL.resolution) == (512, 1024)
    assert (bases.SDXL_REFINER.context_dim, bases.SDXL_REFINER.y_dim) == (1280, 2560)
    assert [b.name for b in bases.KNOWN_MODELS if b.supported] == ["sd15", "sdxl"]
    assert bases.base_of_unet(768, None) is bases.SD15
    assert bases.base_of_unet(2048, 2816) is bases.SDXL
    assert bases.base_of_unet(1280, 2560) is bases.SDXL_REFINER
    assert bases.base_of_unet(1024, None) is None            # SD2
    assert bases.base_of_unet(2048, None) is None
    assert bases.base_of_text_streams({"l": 768, "g": 1280}) is bases.SDXL
    assert bases.base_of_text_streams({"g": 1280}) is bases.SDXL_REFINER
    assert bases.base_of_text_streams({"h": 1024}) is None


def test_comfyui_models_and_text_encoders_are_recognised_by_shape(pack, tiny_model, sdxl_model, refiner_model,
                                                                  clips):
    from comfyui_moa.moa_attention.comfyui.models import check_model_base, model_base, sd15_tokenizer, text_streams
    from comfyui_moa.moa_attention.engine import bases
    assert [model_base(m) for m in (tiny_model, sdxl_model, refiner_model)] == [
        bases.SD15, bases.SDXL, bases.SDXL_REFINER]
    assert check_model_base(tiny_model, "sd15", ADAPTER_NAME) is bases.SD15
    assert text_streams(clips["sd15"]) == {"l": 768}
    assert text_streams(clips["sdxl"]) == {"l": 768, "g": 1280}
    assert text_streams(clips["sdxl_refiner"]) == {"g": 1280}
    assert sd15_tokenizer(clips["sd15"]) is clips["sd15"].tokenizer.clip_l


# --------------------------------------------------------------------------- models

def test_sdxl_model_with_an_sd15_adapter_is_refused_naming_both_bases(sdxl_model, clips, sd15_adapter, subjects):
    with pytest.raises(ValueError, match=r"^MoA Apply: model is SDXL, an SDXL \(context 2048, y 2816\) model, but "
                                         rf"the adapter '{ADAPTER_NAME}' was trained on SD1\.5\. Load an SD1\.5 "
                                         r"checkpoint, or use an adapter trained on SDXL$"):
        apply(sdxl_model, sd15_adapter, clips["sd15"], None, subjects)


def test_sd15_model_with_an_sdxl_adapter_is_refused_naming_both_bases(tiny_model, clips, sd15_adapter, subjects):
    sd15_adapter.adapter.config.base = "sdxl"      # as an SDXL adapter would say (no file of it loads here)
    with pytest.raises(ValueError, match=r"model is SD15, an SD1\.5 \(context 768\) model, but the adapter "
                                         rf"'{ADAPTER_NAME}' was trained on SDXL\. Load an SDXL checkpoint"):
        apply(tiny_model, sd15_adapter, clips["sd15"], None, subjects)


def test_the_refiner_is_refused_by_name(refiner_model, clips, sd15_adapter, subjects):
    with pytest.raises(ValueError, match=r"^MoA Apply: model is SDXLRefiner, the SDXL refiner \(context 1280, y "
                                         r"2560\): MoA does not run on the refiner, only on a base model\. Load an "
                                         r"SD1\.5 or SDXL checkpoint$"):
        apply(refiner_model, sd15_adapter, clips["sd15"], None, subjects)


def test_the_trainer_takes_sd15_and_sdxl_and_refuses_the_refiner_and_v_prediction(pack, tiny_model, sdxl_model,
                                                                                    refiner_model):
    """What load_base_checkpoint (the trainer's --base) checks: the bases MoA Apply runs, predicting
    the noise; a v-prediction SDXL fine-tune is refused by name, not trained on the wrong target."""
    import comfy.model_patcher
    import comfy.supported_models
    from support.model_factory import tiny_sdxl_unet_config

    from comfyui_moa.moa_attention.comfyui.models import check_training_base
    from comfyui_moa.moa_attention.engine import bases
    assert check_training_base(tiny_model) is bases.SD15
    assert check_training_base(sdxl_model) is bases.SDXL
    with pytest.raises(ValueError, match=r"^model is SDXLRefiner, the SDXL refiner \(context 1280, y 2560\): MoA "
                                         r"does not run on the refiner"):
        check_training_base(refiner_model)
    v_pred = comfy.supported_models.SDXL(tiny_sdxl_unet_config()).get_model({"v_pred": torch.zeros(())})
    with pytest.raises(ValueError, match=r"^model is SDXL with prediction type V_PREDICTION: the trainer trains on "
                                         r"noise-predicting \(EPS\) checkpoints only, as the SD1\.5 and SDXL base "
                                         r"releases are\. Train on an EPS checkpoint"):
        check_training_base(comfy.model_patcher.ModelPatcher(v_pred, "cpu", "cpu"))


# --------------------------------------------------------------------------- text encoders

SDXL_CLIP_ON_SD15 = (r"clip is the SDXL text encoder \(clip_l 768 \+ clip_g 1280\), but MoA here needs the SD1\.5 "
                     r"one \(clip_l 768\)\. Connect the CLIP output of the SD1\.5 checkpoint's loader")


def test_an_sd15_model_with_an_sdxl_clip_is_refused_by_name(tiny_model, clips, sd15_adapter, subjects):
    with pytest.raises(ValueError, match=rf"^MoA Apply: {SDXL_CLIP_ON_SD15}$"):
        apply(tiny_model, sd15_adapter, clips["sdxl"], None, subjects)


def test_the_prompt_path_refuses_an_sdxl_clip_before_encoding(pack, clips):
    """Where a raw LayerNorm shape error used to come from: the 2048-wide prompt in the fusion MLP."""
    from comfyui_moa.moa_attention.comfyui.prompt import encode_prompt
    from comfyui_moa.moa_attention.engine.errors import ModelMismatchError
    with pytest.raises(ModelMismatchError, match=rf"^{SDXL_CLIP_ON_SD15}$"):
        encode_prompt(clips["sdxl"], "a photo of a man", ["man"])


@pytest.mark.parametrize("clip,base,pattern", [
    ("sd15", "sdxl", r"clip is the SD1\.5 text encoder \(clip_l 768\), but MoA here needs the SDXL one \(clip_l 768 "
                     r"\+ clip_g 1280\)\. Connect the CLIP output of the SDXL checkpoint's loader"),
    ("sdxl_refiner", "sd15", r"clip is the SDXL refiner text encoder \(clip_g 1280\), but MoA here needs the SD1\.5 "
                             r"one \(clip_l 768\)"),
])
def test_every_other_text_encoder_pairing_is_refused(pack, clips, clip, base, pattern):
    from comfyui_moa.moa_attention.comfyui.models import check_text_encoder_base
    with pytest.raises(ValueError, match=pattern):
        check_text_encoder_base(clips[clip], base)


# --------------------------------------------------------------------------- image encoders

def test_image_encoders_are_named_by_width_and_input_size(pack, vision):
    from comfyui_moa.moa_attention.comfyui.models import image_encoder_of
    assert image_encoder_of(vision["vitl"]) == ("clip_vit_l14", 768)
    assert image_encoder_of(vision["vith"]) == ("clip_vit_h14", 1024)
    assert image_encoder_of(vision["vitl336"]) == ("clip_vit_l14_336", 768)
    with pytest.raises(ValueError, match=r"^--clip-vision is None\. Load the CLIP ViT-L/14 vision model"):
        image_encoder_of(None, "--clip-vision")


def test_apply_refuses_an_image_encoder_of_another_width(tiny_model, clips, vision, sd15_adapter, subjects):
    with pytest.raises(ValueError, match=r"^MoA Apply: clip_vision gives 1024-d image embeddings, but the adapter "
                                         r"expects clip_vit_l14 \(768-d\)\. Load the image encoder the adapter was "
                                         r"trained with"):
        apply(tiny_model, sd15_adapter, clips["sd15"], vision["vith"], subjects)


def _examples(n: int, image_dim: int) -> list:
    from comfyui_moa.moa_attention.training.encode import Example
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(1, 8, 8)
    masks[:, 2:6, 2:6] = 1
    return [Example(torch.randn(4, 8, 8, generator=g), torch.randn(77, 768, generator=g), [[2]],
                    [torch.randn(image_dim, generator=g)], masks, "a dog") for _ in range(n)]


def _config(out: Path, **options):
    from comfyui_moa.moa_attention.training.config import TrainConfig
    base = dict(rank=2, batch_size=1, lr=1e-3, steps=1, seed=0, checkpoint_every=1, log_every=1, eval_examples=1,
                device="cpu")
    return TrainConfig(Path(), Path(), Path(), out, **{**base, **options})


def test_the_trainer_records_the_image_encoder_it_was_given_and_refuses_another_width(tiny_model, tmp_path):
    from comfyui_moa.moa_attention.comfyui.sampling import alphas_cumprod
    from comfyui_moa.moa_attention.engine.adapter_file import load_adapter, read_adapter_metadata
    from comfyui_moa.moa_attention.training.loop import train_adapter
    unet, schedule, out = tiny_model.model.diffusion_model, alphas_cumprod(tiny_model.model), tmp_path / "run"
    vit_h = ("clip_vit_h14", 1024)
    assert train_adapter(_config(out), unet, schedule, _examples(1, 1024), "cpu", image_encoder=vit_h) == 0
    meta = read_adapter_metadata(out / "adapter.safetensors")
    assert (meta["moa.image_encoder"], meta["moa.image_dim"]) == ("clip_vit_h14", "1024")
    assert load_adapter(out / "adapter.safetensors").fusion.image_dim == 1024
    with pytest.raises(ValueError, match=r"^--clip-vision is clip_vit_l14 \(768-d image embeddings\), but the "
                                         r"checkpoint being resumed \(.*step_000001\) was trained with clip_vit_h14 "
                                         r"\(1024-d\)\. Pass that run's --clip-vision"):
        train_adapter(_config(out, steps=2, resume=True), unet, schedule, _examples(1, 768), "cpu",
                      image_encoder=("clip_vit_l14", 768))
    with pytest.raises(ValueError, match=r"^the encoded dataset holds 768-d image features \('a dog'\), but the "
                                         r"adapter expects clip_vit_h14 \(1024-d\)\. Encode the subjects with the "
                                         r"image encoder the adapter is made for \(--clip-vision\)"):
        train_adapter(_config(tmp_path / "other"), unet, schedule, _examples(1, 768), "cpu", image_encoder=vit_h)


def test_the_trainer_writes_identity_tokens_in_format_3_and_resumes_only_with_the_same_count(tiny_model, tmp_path):
    from comfyui_moa.moa_attention.comfyui.sampling import alphas_cumprod
    from comfyui_moa.moa_attention.engine.adapter_file import load_adapter, read_adapter_metadata
    from comfyui_moa.moa_attention.training.loop import train_adapter
    unet, schedule, out = tiny_model.model.diffusion_model, alphas_cumprod(tiny_model.model), tmp_path / "run"
    assert train_adapter(_config(out, identity_tokens=2), unet, schedule, _examples(1, 768), "cpu") == 0
    meta = read_adapter_metadata(out / "adapter.safetensors")
    assert (meta["moa.format_version"], meta["moa.identity_tokens"]) == ("3", "2")
    assert load_adapter(out / "adapter.safetensors").fusion.tokens == 2
    with pytest.raises(ValueError, match=r"^--identity-tokens is 1, but the checkpoint being resumed "
                                         r"\(.*step_000001\) was trained with 2\. Pass that run's --identity-tokens"):
        train_adapter(_config(out, steps=2, resume=True), unet, schedule, _examples(1, 768), "cpu")


def test_the_trainer_writes_a_prompt_schedule_in_format_4_and_resumes_only_with_it(tiny_model, tmp_path):
    from comfyui_moa.moa_attention.comfyui.sampling import alphas_cumprod
    from comfyui_moa.moa_attention.engine.adapter_file import load_adapter, read_adapter_metadata
    from comfyui_moa.moa_attention.training.cli import parse_args
    from comfyui_moa.moa_attention.training.loop import train_adapter
    unet, schedule, out = tiny_model.model.diffusion_model, alphas_cumprod(tiny_model.model), tmp_path / "run"
    assert train_adapter(_config(out, prompt_schedule=True, steps=2), unet, schedule, _examples(1, 768), "cpu") == 0
    meta = read_adapter_metadata(out / "adapter.safetensors")
    assert (meta["moa.format_version"], meta["moa.prompt_schedule"]) == ("4", "timestep_layer")
    trained = load_adapter(out / "adapter.safetensors").prompt_schedule.out.weight
    assert trained.abs().max() > 0, "training moved the schedule off its fresh zero (from step 2: the fusion's first)"
    with pytest.raises(ValueError, match=r"^the checkpoint being resumed \(.*step_000002\) was trained with "
                                         r"--prompt-schedule\. Resume it with --prompt-schedule, or train into a new"):
        train_adapter(_config(out, steps=3, resume=True), unet, schedule, _examples(1, 768), "cpu")
    args = ["--base", "b", "--clip-vision", "c", "--data", "d", "--output-dir", "o"]
    assert parse_args(args + ["--prompt-schedule"]).prompt_schedule and not parse_args(args).prompt_schedule


def test_the_trainer_refuses_to_resume_a_checkpoint_of_another_unet(tiny_model, tmp_path):
    """A run resumed on another --base architecture (here a smaller SD1.5-shaped UNet; an SDXL one for
    an SD1.5 run differs alike) is refused before any layer is patched."""
    from support.model_factory import build_sd15_model_patcher, tiny_unet_config

    from comfyui_moa.moa_attention.comfyui.sampling import alphas_cumprod
    from comfyui_moa.moa_attention.training.loop import train_adapter
    schedule, out = alphas_cumprod(tiny_model.model), tmp_path / "run"
    assert train_adapter(_config(out), tiny_model.model.diffusion_model, schedule, _examples(1, 768), "cpu") == 0
    other = build_sd15_model_patcher(tiny_unet_config(model_channels=32, levels=1), seed=0)
    with pytest.raises(ValueError, match=r"^--base has 6 attention layers, but the checkpoint being resumed "
                                         r"\(.*step_000001\) was trained on another UNet \(sd15, 14 layers\)\. Pass "
                                         r"that run's --base, or train into a new --output-dir$"):
        train_adapter(_config(out, steps=2, resume=True), other.model.diffusion_model, schedule, _examples(1, 768),
                      "cpu")
