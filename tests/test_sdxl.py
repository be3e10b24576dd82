"""MoA on SDXL: the adapter file (format 2), the fusion's per-stream normalisation, the prompt
bound in both text streams (clip_l and clip_g), and the patch through ComfyUI's sampler on a
tiny SDXL-architecture UNet, as test_moa_patch.py does for SD1.5. The models are ComfyUI's own
SDXL classes built in-process (tests/support/model_factory.py)."""
from __future__ import annotations

import json

import pytest
import torch

STEPS = 3
CFG = 5.0
PROMPT = "a photo of a man at the beach"


@pytest.fixture(scope="module")
def subjects(comfy):
    from comfyui_moa.nodes.subject import MoASubject
    return MoASubject().build(torch.rand(1, 64, 64, 3), "man", mask=torch.ones(1, 64, 64))[0]


def fresh_adapter(model, expert: str = "lowrank", seed: int = 0):
    from comfyui_moa.moa_attention.engine.adapter import init_adapter_from_unet
    return init_adapter_from_unet(model.get_model_object("diffusion_model"), expert=expert, rank=4, seed=seed)


def force_router(ad, personal: bool, margin: float = 50.0) -> None:
    for w in ad.layers.values():
        w.router.fc2.weight.data.zero_()
        w.router.fc2.bias.data = torch.tensor([-margin, margin] if personal else [margin, -margin])


def trained_looking(model, expert: str = "lowrank", seed: int = 0):
    """personal != prior, a fusion MLP that moves the token, every pixel routed to the expert."""
    ad = fresh_adapter(model, expert, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for p in list(ad.layers.parameters()) + list(ad.fusion.parameters()):
        p.data.add_(torch.randn(p.shape, generator=g) * 0.3)
    force_router(ad, personal=True)
    return ad


def conds(seed: int = 0):
    """(plain [77, 2048], positive, negative) with SDXL's pooled output, as CLIPTextEncode gives."""
    g = torch.Generator().manual_seed(seed)
    plain, neg = torch.randn(77, 2048, generator=g), torch.randn(77, 2048, generator=g)
    return (plain, [[plain[None].clone(), {"pooled_output": torch.randn(1, 1280, generator=g)}]],
            [[neg[None], {"pooled_output": torch.randn(1, 1280, generator=g)}]])


def sample(comfy, model, positive, negative, seed: int = 7, hw: int = 16):
    latent = {"samples": torch.zeros(1, 4, hw, hw)}
    return comfy[0].common_ksampler(model, seed, STEPS, CFG, "euler", "normal", positive, negative, latent)[0]["samples"]


def bind(plain, fused=None):
    from comfyui_moa.moa_attention.comfyui.batch import SubjectBinding
    return [SubjectBinding(plain=plain, fused=plain.clone() if fused is None else fused)]


def apply_moa(model, ad, bindings, **knobs):
    from comfyui_moa.moa_attention.comfyui.patch import apply_moa as apply
    return apply(model, ad, bindings, **knobs)


# --------------------------------------------------------------------------- adapter and file

def test_a_fresh_sdxl_adapter_is_an_sdxl_one_over_every_layer(sdxl_model):
    from comfyui_moa.moa_attention.engine.unet_layers import find_attention_layers
    ad = fresh_adapter(sdxl_model)
    specs = find_attention_layers(sdxl_model.get_model_object("diffusion_model"))
    assert (ad.config.base, ad.config.text_dim, ad.fusion.streams) == ("sdxl", 2048, (768, 1280))
    assert ad.config.layers == specs and len(specs) == 8
    assert {s.context_dim for s in specs if s.kind == "attn2"} == {2048}


def test_the_full_sdxl_unet_has_140_moa_layers_of_sdxls_widths(comfy):
    """The census of the real SDXL base UNet (ComfyUI's SDXL model config, built on the meta device:
    no memory): 70 transformer blocks, 10 at 640 channels / 10 heads and 60 at 1280 / 20 heads."""
    from collections import Counter

    import comfy.supported_models
    from support.model_factory import sdxl_unet_config

    from comfyui_moa.moa_attention.engine.unet_layers import find_attention_layers
    model = comfy.supported_models.SDXL(sdxl_unet_config()).get_model({}, device="meta")
    specs = find_attention_layers(model.diffusion_model)
    assert len(specs) == 140 and Counter(s.kind for s in specs) == {"attn1": 70, "attn2": 70}
    assert Counter((s.query_dim, s.heads) for s in specs) == {(640, 10): 20, (1280, 20): 120}
    assert {s.context_dim for s in specs if s.kind == "attn2"} == {2048}
    assert {s.context_dim for s in specs if s.kind == "attn1"} == {640, 1280}


@pytest.mark.parametrize("expert", ["lowrank", "full"])
def test_sdxl_adapter_file_round_trips_as_format_2(pack, sdxl_model, tmp_path, expert):
    from comfyui_moa.moa_attention.engine import adapter_file as io
    ad = trained_looking(sdxl_model, expert)
    path = io.save_adapter(ad, tmp_path / "subject_sdxl.safetensors", dtype=torch.float32)
    meta = io.read_adapter_metadata(path)
    assert (meta["moa.format_version"], meta["moa.base"], meta["moa.text_dim"]) == ("2", "sdxl", "2048")
    assert json.loads(meta["moa.text_streams"]) == [["l", 768], ["g", 1280]]
    loaded = io.load_adapter(path)
    assert (loaded.config.base, loaded.config.layers, loaded.fusion.streams) == ("sdxl", ad.config.layers, (768, 1280))
    want, got = ad.state_dict(), loaded.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def _rewrite(path, **meta):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(path), framework="pt") as f:
        header = {**f.metadata(), **meta}
    save_file(load_file(str(path)), str(path), metadata=header)


def test_sdxl_files_ask_older_packs_for_an_update_and_refuse_edited_streams(pack, sdxl_model, tmp_path, monkeypatch):
    from comfyui_moa.moa_attention.engine import adapter_file as io
    from comfyui_moa.moa_attention.engine.errors import AdapterFileError
    path = io.save_adapter(fresh_adapter(sdxl_model), tmp_path / "xl.safetensors")
    with monkeypatch.context() as m:          # a pack that reads format 1 only, as every SD1.5-only release did
        m.setattr(io, "FORMAT_VERSION", 1)
        with pytest.raises(AdapterFileError, match=r"'xl\.safetensors': written in adapter format 2, this comfyui-moa "
                                                   r"reads up to 1\. Update comfyui-moa \(ComfyUI Manager > Update\)"):
            io.load_adapter(path)
    _rewrite(path, **{"moa.text_streams": json.dumps([["g", 1280], ["l", 768]])})
    with pytest.raises(AdapterFileError, match=r"text streams \[\['g', 1280\], \['l', 768\]\] in its header, SDXL "
                                               r"has \[\['l', 768\], \['g', 1280\]\]\. Re-export the adapter"):
        io.load_adapter(path)


def test_the_fusion_normalises_each_text_stream_on_its_own(pack):
    from torch.nn import functional as F

    from comfyui_moa.moa_attention.engine.fusion import FusionMLP
    fusion = FusionMLP(2048, 768, 64, streams=(768, 1280))
    fusion.norm.weight.data.uniform_(0.5, 1.5)
    text = torch.randn(3, 2048)
    text[:, 768:] *= 50.0                              # clip_g's scale must not squash clip_l's slice
    normed = fusion.normalise(text)
    w, b = fusion.norm.weight, fusion.norm.bias
    assert torch.allclose(normed[:, :768], F.layer_norm(text[:, :768], (768,), w[:768], b[:768]), atol=1e-6)
    assert torch.allclose(normed[:, 768:], F.layer_norm(text[:, 768:], (1280,), w[768:], b[768:]), atol=1e-6)
    one = FusionMLP(768, 768, 64)                      # SD1.5: one stream, the whole token as before
    assert torch.equal(one.normalise(text[:, :768]), F.layer_norm(text[:, :768], (768,), one.norm.weight,
                                                                  one.norm.bias))
    with pytest.raises(ValueError, match=r"text streams \(768, 1024\) do not add up to the text width 2048"):
        FusionMLP(2048, 768, streams=(768, 1024))


# --------------------------------------------------------------------------- through ComfyUI's sampler

@pytest.mark.parametrize("expert", ["lowrank", "full"])
@pytest.mark.parametrize("routing", ["soft", "hard"])
def test_fresh_adapter_on_sdxl_is_bit_identical_whatever_the_router_says(comfy, sdxl_model, expert, routing):
    plain, pos, neg = conds()
    base = sample(comfy, sdxl_model, pos, neg)
    ad = fresh_adapter(sdxl_model, expert)
    force_router(ad, personal=True)
    patched = apply_moa(sdxl_model, ad, bind(plain), hard_routing=routing == "hard")
    assert torch.equal(sample(comfy, patched, pos, neg), base)
    rec = patched.get_attachment("moa").recorder
    assert len(rec.layers) == 8 and rec.average().min().item() == pytest.approx(1.0)   # the expert really ran


def test_strength_zero_on_sdxl_is_the_base_model_bit_for_bit(comfy, sdxl_model):
    plain, pos, neg = conds()
    base = sample(comfy, sdxl_model, pos, neg)
    ad = trained_looking(sdxl_model)
    assert (sample(comfy, apply_moa(sdxl_model, ad, bind(plain)), pos, neg) - base).abs().max() > 1e-2
    assert torch.equal(sample(comfy, apply_moa(sdxl_model, ad, bind(plain), strength=0.0), pos, neg), base)


def _denoised_at_first_step(model):
    """(cond, uncond) denoised predictions of the sampler's first step, where x is the same noise
    for every model, read through ComfyUI's post-CFG hook."""
    seen = []

    def record(args):
        seen.append((args["cond_denoised"].clone(), args["uncond_denoised"].clone()))
        return args["denoised"]
    watched = model.clone()
    watched.set_model_sampler_post_cfg_function(record)
    return watched, seen


def test_sdxl_uncond_rows_stay_the_base_model_and_cond_rows_change(comfy, sdxl_model):
    plain, pos, neg = conds()
    base, base_seen = _denoised_at_first_step(sdxl_model)
    sample(comfy, base, pos, neg)
    moa, moa_seen = _denoised_at_first_step(apply_moa(sdxl_model, trained_looking(sdxl_model), bind(plain)))
    sample(comfy, moa, pos, neg)
    (base_cond, base_uncond), (moa_cond, moa_uncond) = base_seen[0], moa_seen[0]
    assert torch.equal(moa_uncond, base_uncond)
    assert (moa_cond - base_cond).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sdxl(comfy, dtype):
    from support.model_factory import build_sdxl_model_patcher, tiny_sdxl_unet_config
    model = build_sdxl_model_patcher(tiny_sdxl_unet_config(), dtype=dtype)
    plain, pos, neg = conds()
    base = sample(comfy, model, pos, neg)
    ad = fresh_adapter(model)                             # an fp32 adapter on a half model
    force_router(ad, personal=True)
    assert torch.equal(sample(comfy, apply_moa(model, ad, bind(plain)), pos, neg), base)
    out = sample(comfy, apply_moa(model, trained_looking(model), bind(plain)), pos, neg)
    assert torch.isfinite(out).all() and not torch.equal(out, base)


@pytest.mark.parametrize("hard", [False, True])
def test_sdxl_region_keeps_the_layer_output_outside_exactly_prior(comfy, sdxl_model, hard):
    """Per cross-attention layer (2048-wide context), pixels outside the region are the prior's bit for bit."""
    from comfyui_moa.moa_attention.comfyui.patch import original_attention
    from comfyui_moa.moa_attention.engine import call_state
    from comfyui_moa.moa_attention.engine.layer import MoAAttention
    ad = trained_looking(sdxl_model)
    spec = next(s for s in ad.config.layers if s.kind == "attn2")
    prior = original_attention(sdxl_model, spec.path)
    moa_layer = MoAAttention(prior, ad.layer(spec.path), spec.path)
    h = w = 8
    x, ctx = torch.randn(2, h * w, spec.query_dim), torch.randn(2, 77, 2048)
    region = torch.zeros(h, w)
    region[:, : w // 2] = 1.0
    state = call_state.CallState.whole_batch(ctx + 1.0, (h, w), call_state.MoASettings(hard=hard),
                                             regions=region[None, None].repeat(2, 1, 1, 1))
    opts = {call_state.STATE_KEY: state, "activations_shape": [2, spec.query_dim, h, w]}
    with torch.no_grad():
        ref, out = prior(x, context=ctx), moa_layer(x, context=ctx, transformer_options=opts)
    inside = region.flatten().bool()
    assert torch.equal(out[:, ~inside], ref[:, ~inside])
    assert (out[:, inside] - ref[:, inside]).abs().max() > 1e-3


# --------------------------------------------------------------------------- the prompt's two streams

def _rows_of(clip, text: str, word: str, stream: str) -> list[int]:
    from comfyui_moa.moa_attention.comfyui.prompt import token_chunks, word_tokens
    from comfyui_moa.moa_attention.engine.prompt_tokens import occurrences
    return [p for occ in occurrences(token_chunks(clip, text, stream)[1], word_tokens(clip, word, stream)) for p in occ]


def test_class_words_are_bound_in_both_streams_with_weights_and_two_chunks(pack, sdxl_clip):
    from comfyui_moa.moa_attention.comfyui.prompt import encode_prompt
    weighted = encode_prompt(sdxl_clip, "a photo of a (man:1.3) and a dog", ["man", "dog"], "sdxl")
    assert weighted.positions == [[5], [8]] and weighted.plain.shape == (77, 2048)
    assert weighted.conditioning[0][1]["pooled_output"].shape == (1, 1280)
    long = "a photo of " + "very " * 80 + "a man"
    two = encode_prompt(sdxl_clip, long, ["man"], "sdxl")
    assert two.chunks == 2 and two.plain.shape == (154, 2048) and two.positions[0][0] > 77
    assert two.positions[0] == _rows_of(sdxl_clip, long, "man", "l") == _rows_of(sdxl_clip, long, "man", "g")


def test_streams_shifted_by_a_one_sided_embedding_are_refused(pack, sdxl_clip, tmp_path):
    """An embedding with two vectors for clip_l but one for clip_g moves every later clip_l token."""
    import comfy.sdxl_clip
    from safetensors.torch import save_file

    from comfyui_moa.moa_attention.comfyui.prompt import encode_prompt
    from comfyui_moa.moa_attention.engine.errors import ClassWordError
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(1, 1280)}, str(tmp_path / "odd.safetensors"))
    clip = sdxl_clip.clone()
    clip.tokenizer = comfy.sdxl_clip.SDXLTokenizer(embedding_directory=str(tmp_path))
    with pytest.raises(ClassWordError, match=r"^the prompt's text encoders disagree: the class word 'man' is at rows "
                                             r"\[7\] of clip_l but rows \[6\] of clip_g\. An embedding "
                                             r"\(embedding:name\) made for one of them only shifts the other's "
                                             r"tokens; use an embedding with weights for both \(clip_l and clip_g\) "
                                             r"or remove it from the prompt$"):
        encode_prompt(clip, "embedding:odd a photo of a man", ["man"], "sdxl")
    assert encode_prompt(clip, "a photo of a man", ["man"], "sdxl").positions == [[5]]


def test_streams_of_different_lengths_are_refused(pack):
    from comfyui_moa.moa_attention.engine.errors import ClassWordError
    from comfyui_moa.moa_attention.engine.prompt_tokens import WordTokens, bind_streams
    man = [WordTokens("man", (9,))]
    assert bind_streams({"l": [[1, 9, 2]], "g": [[1, 9, 0]]}, {"l": man, "g": man}) == [[1]]
    with pytest.raises(ClassWordError, match=r"disagree: clip_l has 3 tokens but clip_g has 6\. An embedding"):
        bind_streams({"l": [[1, 9, 2]], "g": [[1, 9, 0], [1, 5, 0]]}, {"l": man, "g": man})


# --------------------------------------------------------------------------- MoA Apply

def _apply(model, adapter, clip, vision, subjects, strength=1.0):
    from comfyui_moa.nodes.apply import MoAApply
    return MoAApply().apply(model, adapter, clip, vision, subjects, PROMPT, strength, 0.0, 1.0, "soft")


def test_moa_apply_and_router_maps_on_sdxl_end_to_end(comfy, sdxl_model, sdxl_clip, tiny_vision, subjects):
    """The SDXL CLIP's conditioning, pooled output included, goes to the sampler as CLIPTextEncode
    makes it; only the class word's row of the personalized context is fused, in both slices."""
    from comfyui_moa.moa_attention.comfyui.adapters import LoadedAdapter
    from comfyui_moa.nodes.router_maps import MoARouterMaps
    encode = comfy[0].CLIPTextEncode()
    plain, negative = encode.encode(sdxl_clip, PROMPT)[0], encode.encode(sdxl_clip, "")[0]
    adapter = LoadedAdapter(trained_looking(sdxl_model), "subject_sdxl.safetensors")
    model, positive = _apply(sdxl_model, adapter, sdxl_clip, tiny_vision, subjects)
    assert torch.equal(positive[0][0], plain[0][0])
    assert torch.equal(positive[0][1]["pooled_output"], plain[0][1]["pooled_output"])
    binding = model.get_attachment("moa").bindings[0]
    moved = (binding.fused - binding.plain).abs()
    assert moved.shape == (77, 2048)
    assert torch.nonzero(moved.amax(-1)).flatten().tolist() == [5]          # "a photo of a man": row 5
    assert moved[5, :768].max() > 0 and moved[5, 768:].max() > 0

    base = sample(comfy, sdxl_model, plain, negative)
    out = sample(comfy, model, positive, negative)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-2
    mask, overlay = MoARouterMaps().maps(model, {"samples": out}, "cross-attention (attn2)")
    assert mask.shape == (1, 128, 128) and overlay.shape == (1, 128, 128, 3)
    assert mask.min().item() == pytest.approx(1.0)                          # every pixel routed to the subject

    zero, positive0 = _apply(sdxl_model, adapter, sdxl_clip, tiny_vision, subjects, strength=0.0)
    assert torch.equal(sample(comfy, zero, positive0, negative), base)


def test_moa_apply_refuses_an_sdxl_adapter_with_the_sd15_clip(comfy, sdxl_model, tiny_vision, subjects):
    from comfyui_moa.moa_attention.comfyui.adapters import LoadedAdapter
    from support.model_factory import build_tiny_clip
    adapter = LoadedAdapter(fresh_adapter(sdxl_model), "subject_sdxl.safetensors")
    with pytest.raises(ValueError, match=r"^MoA Apply: clip is the SD1\.5 text encoder \(clip_l 768\), but MoA here "
                                         r"needs the SDXL one \(clip_l 768 \+ clip_g 1280\)"):
        _apply(sdxl_model, adapter, build_tiny_clip("sd15"), tiny_vision, subjects)
