"""The MoA patch on a real ComfyUI ModelPatcher (tiny SD1.5 UNet, in-process sampling)."""
from __future__ import annotations

import pytest
import torch

STEPS = 3
CFG = 5.0


@pytest.fixture
def engine(pack):
    from comfyui_moa.moa_attention.comfyui import batch, patch
    from comfyui_moa.moa_attention.engine import adapter, call_state, layer
    return adapter, batch, patch, layer, call_state


def conds(seed: int = 0, length: int = 77):
    g = torch.Generator().manual_seed(seed)
    plain = torch.randn(length, 768, generator=g)
    neg = torch.randn(length, 768, generator=g)
    return plain, [[plain[None].clone(), {}]], [[neg[None], {}]]


def sample(comfy, model, positive, negative, batch: int = 1, seed: int = 7, hw: int = 16):
    nodes = comfy[0]
    latent = {"samples": torch.zeros(batch, 4, hw, hw)}
    return nodes.common_ksampler(model, seed, STEPS, CFG, "euler", "normal", positive, negative, latent)[0]["samples"]


def fresh_adapter(engine, model, expert="lowrank", seed=0):
    adapter = engine[0]
    return adapter.init_adapter_from_unet(model.get_model_object("diffusion_model"), expert=expert, rank=4, seed=seed)


def force_router(ad, personal: bool, margin: float = 50.0):
    for w in ad.layers.values():
        w.router.fc2.weight.data.zero_()
        w.router.fc2.bias.data = torch.tensor([-margin, margin] if personal else [margin, -margin])


def perturb(ad, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    for w in ad.layers.values():
        for p in w.expert.parameters():
            p.data.add_(torch.randn(p.shape, generator=g) * scale)
    for p in ad.fusion.parameters():
        p.data.add_(torch.randn(p.shape, generator=g) * scale)


def trained_looking_adapter(engine, model, seed=0):
    """personal != prior and every pixel routed to the personalized expert."""
    ad = fresh_adapter(engine, model, seed=seed)
    perturb(ad, seed=seed + 1)
    force_router(ad, personal=True)
    return ad


def bind(engine, plain, fused=None, region=None):
    return [engine[1].SubjectBinding(plain=plain, fused=plain.clone() if fused is None else fused, region=region)]


@pytest.mark.parametrize("expert", ["lowrank", "full"])
@pytest.mark.parametrize("routing", ["soft", "hard"])
def test_fresh_adapter_is_bit_identical_whatever_the_router_says(comfy, engine, tiny_model, expert, routing):
    plain, pos, neg = conds()
    base = sample(comfy, tiny_model, pos, neg)
    ad = fresh_adapter(engine, tiny_model, expert)
    force_router(ad, personal=True)
    fused = plain.clone()
    fused[3] += 1.0                      # even a fused token: a fresh fusion MLP is not used here
    patched = engine[2].apply_moa(tiny_model, ad, bind(engine, plain), hard_routing=routing == "hard")
    out = sample(comfy, patched, pos, neg)
    assert torch.equal(out, base)
    rec = patched.get_attachment("moa").recorder
    assert len(rec.layers) == 2 * 7      # the personalized expert really ran in all 14 layers
    assert rec.average().min().item() == pytest.approx(1.0)


def test_strength_zero_and_prior_router_reproduce_the_base_model(comfy, engine, tiny_model):
    plain, pos, neg = conds()
    base = sample(comfy, tiny_model, pos, neg)
    ad = trained_looking_adapter(engine, tiny_model)
    moa = engine[2].apply_moa(tiny_model, ad, bind(engine, plain))
    changed = sample(comfy, moa, pos, neg)
    assert (changed - base).abs().max() > 1e-2, "a perturbed adapter must change the result"

    zero = engine[2].apply_moa(tiny_model, ad, bind(engine, plain), strength=0.0)
    assert (sample(comfy, zero, pos, neg) - base).abs().max().item() <= 1e-6

    force_router(ad, personal=False)
    prior = engine[2].apply_moa(tiny_model, ad, bind(engine, plain))
    assert (sample(comfy, prior, pos, neg) - base).abs().max().item() <= 1e-6


def test_schedule_window_outside_the_run_is_the_base_model(comfy, engine, tiny_model):
    plain, pos, neg = conds()
    base = sample(comfy, tiny_model, pos, neg)
    ad = trained_looking_adapter(engine, tiny_model)
    late = engine[2].apply_moa(tiny_model, ad, bind(engine, plain), start_percent=0.0, end_percent=0.0)
    assert torch.equal(sample(comfy, late, pos, neg), base)
    partial = engine[2].apply_moa(tiny_model, ad, bind(engine, plain), start_percent=0.5, end_percent=1.0)
    full = engine[2].apply_moa(tiny_model, ad, bind(engine, plain))
    out_partial, out_full = sample(comfy, partial, pos, neg), sample(comfy, full, pos, neg)
    assert not torch.equal(out_partial, base) and not torch.equal(out_partial, out_full)


@pytest.mark.parametrize("knobs, message", [
    ({"strength": float("nan")}, r"^strength must be a number in \[0, 3.0\], got nan \(0 = the base model"),
    ({"strength": 3.5}, r"^strength must be a number in \[0, 3.0\], got 3.5 "),
    ({"end_percent": float("nan")}, r"^end_percent must be a number in \[0, 1\], got nan$"),
    ({"start_percent": -0.1}, r"^start_percent must be a number in \[0, 1\], got -0.1$"),
    ({"start_percent": 0.6, "end_percent": 0.4}, r"^start_percent \(0.6\) is after end_percent \(0.4\)\. Make "),
    ({"sparse_threshold": float("nan")}, r"^sparse_threshold must be a number in \[0, 0.5\], got nan \(0 = off"),
    ({"sparse_threshold": 0.6}, r"^sparse_threshold must be a number in \[0, 0.5\], got 0.6 "),
])
def test_apply_moa_refuses_bad_knobs_and_leaves_the_model_alone(engine, tiny_model, knobs, message):
    """apply_moa is where strength and the schedule are checked (MoA Apply relies on it): NaN,
    which ComfyUI's widget range check lets through, is refused too, before anything is cloned."""
    from comfyui_moa.moa_attention.engine.errors import MoAInputError
    plain, _, _ = conds()
    ad = fresh_adapter(engine, tiny_model)
    patches = dict(tiny_model.object_patches)
    with pytest.raises(MoAInputError, match=message):
        engine[2].apply_moa(tiny_model, ad, bind(engine, plain), **knobs)
    assert tiny_model.object_patches == patches and tiny_model.get_attachment("moa") is None


def test_sparse_soft_routing_through_the_sampler(comfy, engine, tiny_model):
    """sparse_threshold 0 is dense soft routing bit for bit; where the shares are 0 or 1 (a region
    and a router forced to the expert) sparse soft samples dense soft's latent to float rounding;
    strength 0 and a fresh adapter stay the base model bit for bit with it on."""
    plain, pos, neg = conds()
    base = sample(comfy, tiny_model, pos, neg)
    apply_moa = engine[2].apply_moa
    ad = trained_looking_adapter(engine, tiny_model)
    dense = sample(comfy, apply_moa(tiny_model, ad, bind(engine, plain)), pos, neg)
    assert torch.equal(sample(comfy, apply_moa(tiny_model, ad, bind(engine, plain), sparse_threshold=0.0), pos, neg),
                       dense)
    region = torch.zeros(16, 16)
    region[:, :8] = 1.0
    regional = bind(engine, plain, region=region)
    dense_model = apply_moa(tiny_model, ad, regional)
    dense_region = sample(comfy, dense_model, pos, neg)
    sparse = apply_moa(tiny_model, ad, regional, sparse_threshold=0.05)
    sparse_region = sample(comfy, sparse, pos, neg)
    assert (dense_region - base).abs().max() > 1e-2
    torch.testing.assert_close(sparse_region, dense_region, rtol=1e-4, atol=1e-4)
    maps = sparse.get_attachment("moa").recorder.average()
    assert torch.equal(maps, dense_model.get_attachment("moa").recorder.average())   # nothing skipped
    assert maps[0, :, :6].min() == pytest.approx(1.0) and maps[0, :, 10:].max() == 0.0
    zero = apply_moa(tiny_model, ad, bind(engine, plain), strength=0.0, sparse_threshold=0.05)
    assert torch.equal(sample(comfy, zero, pos, neg), base)
    fresh = fresh_adapter(engine, tiny_model)
    for threshold in (0.01, 0.05):       # a fresh router's ~0.018: every pixel computed, then none
        assert torch.equal(sample(comfy, apply_moa(tiny_model, fresh, bind(engine, plain), sparse_threshold=threshold),
                                  pos, neg), base)


def test_unmatched_prompt_runs_the_prior_and_warns(comfy, engine, tiny_model, caplog):
    plain, pos, neg = conds()
    other, pos_other, _ = conds(seed=5)
    base = sample(comfy, tiny_model, pos_other, neg)
    ad = trained_looking_adapter(engine, tiny_model)
    moa = engine[2].apply_moa(tiny_model, ad, bind(engine, plain))
    with caplog.at_level("WARNING", logger="comfyui-moa"):
        out = sample(comfy, moa, pos_other, neg)
    assert torch.equal(out, base)
    assert "Connect MoA Apply's CONDITIONING output" in caplog.text


def test_uncond_rows_and_other_batch_rows_stay_prior(comfy, engine, tiny_model):
    """Batch of 2 latents; router maps show both cond rows personalized, and a negative prompt
    equal to the positive one is still treated as uncond (never personalized)."""
    plain, pos, neg = conds()
    ad = fresh_adapter(engine, tiny_model)
    force_router(ad, personal=True)
    moa = engine[2].apply_moa(tiny_model, ad, bind(engine, plain))
    sample(comfy, moa, pos, neg, batch=2)
    maps = moa.get_attachment("moa").recorder.average()
    assert maps.shape == (2, 16, 16)
    assert torch.allclose(maps, torch.ones_like(maps))


@pytest.mark.parametrize("hard", [False, True])
def test_region_mask_keeps_the_layer_output_outside_exactly_prior(engine, tiny_model, hard):
    """Per layer, pixels outside the region get the prior's output bit for bit; inside they change.
    Hard routing computes the prior only for the pixels outside: they must still be exact."""
    adapter, _, comfy_patch, layer, call_state = engine
    ad = trained_looking_adapter(engine, tiny_model)
    dm = tiny_model.get_model_object("diffusion_model")
    spec = next(s for s in adapter.find_attention_layers(dm) if s.kind == "attn2")
    prior = comfy_patch.original_attention(tiny_model, spec.path)
    moa_layer = layer.MoAAttention(prior, ad.layer(spec.path), spec.path)
    h = w = 8
    x = torch.randn(2, h * w, spec.query_dim)
    ctx = torch.randn(2, 77, 768)
    region = torch.zeros(h, w)
    region[:, : w // 2] = 1.0
    state = call_state.CallState.whole_batch(ctx + 1.0, (h, w), call_state.MoASettings(hard=hard),
                                             regions=region[None, None].repeat(2, 1, 1, 1))
    opts = {"activations_shape": [2, spec.query_dim, h, w]}
    with torch.no_grad():
        ref = prior(x, context=ctx)
        out = moa_layer(x, context=ctx, transformer_options={call_state.STATE_KEY: state, **opts})
    inside = region.flatten().bool()
    assert torch.equal(out[:, ~inside], ref[:, ~inside])
    assert (out[:, inside] - ref[:, inside]).abs().max() > 1e-3


def test_no_leakage_between_clones_and_the_original(comfy, engine, tiny_model):
    plain, pos, neg = conds()
    base = sample(comfy, tiny_model, pos, neg)
    ad_a, ad_b = trained_looking_adapter(engine, tiny_model, seed=1), trained_looking_adapter(engine, tiny_model, seed=2)
    a = engine[2].apply_moa(tiny_model, ad_a, bind(engine, plain))
    b = engine[2].apply_moa(tiny_model, ad_b, bind(engine, plain))
    out_a, out_b = sample(comfy, a, pos, neg), sample(comfy, b, pos, neg)
    assert not torch.equal(out_a, out_b)
    assert torch.equal(sample(comfy, tiny_model, pos, neg), base)       # original after patched runs
    assert torch.equal(sample(comfy, a, pos, neg), out_a)               # interleaved clones don't interfere
    assert torch.equal(sample(comfy, b, pos, neg), out_b)
    assert tiny_model.object_patches == {} and tiny_model.get_attachment("moa") is None
    # chaining: MoA on a MoA model replaces the first patch instead of stacking it
    ab = engine[2].apply_moa(a, ad_b, bind(engine, plain))
    assert torch.equal(sample(comfy, ab, pos, neg), out_b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(comfy, engine, tiny_unet_config, dtype):
    from support.model_factory import build_sd15_model_patcher
    model = build_sd15_model_patcher(tiny_unet_config, seed=0, dtype=dtype)
    plain, pos, neg = conds()
    base = sample(comfy, model, pos, neg)
    ad = fresh_adapter(engine, model)                     # fp32 adapter on a half model
    force_router(ad, True)
    assert torch.equal(sample(comfy, engine[2].apply_moa(model, ad, bind(engine, plain)), pos, neg), base)
    perturb(ad, scale=0.05)
    out = sample(comfy, engine[2].apply_moa(model, ad, bind(engine, plain)), pos, neg)
    assert torch.isfinite(out).all() and not torch.equal(out, base)


def lora_for(model, rank=2, scale=0.5, seed=3):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, value in model.model.diffusion_model.state_dict().items():
        if key.endswith(("attn1.to_q.weight", "attn2.to_v.weight")):
            stem = "diffusion_model." + key[: -len(".weight")]
            sd[f"{stem}.lora_up.weight"] = torch.randn(value.shape[0], rank, generator=g) * scale
            sd[f"{stem}.lora_down.weight"] = torch.randn(rank, value.shape[1], generator=g) * scale
    return sd


def test_lora_before_or_after_moa_still_applies(comfy, engine, tiny_model, caplog):
    from comfy.sd import load_lora_for_models
    plain, pos, neg = conds()
    base = sample(comfy, tiny_model, pos, neg)
    lora = lora_for(tiny_model)
    with caplog.at_level("WARNING"):
        lora_only, _ = load_lora_for_models(tiny_model, None, lora, 1.0, 0.0)
        ref = sample(comfy, lora_only, pos, neg)
        assert not torch.equal(ref, base)
        ad = trained_looking_adapter(engine, tiny_model)
        before = engine[2].apply_moa(lora_only, ad, bind(engine, plain), strength=0.0)
        assert torch.equal(sample(comfy, before, pos, neg), ref)
        moa_zero = engine[2].apply_moa(tiny_model, ad, bind(engine, plain), strength=0.0)
        after, _ = load_lora_for_models(moa_zero, None, lora, 1.0, 0.0)
        assert torch.equal(sample(comfy, after, pos, neg), ref)
        # with MoA on, the LoRA still shapes the prior branch
        on = engine[2].apply_moa(tiny_model, ad, bind(engine, plain))
        on_lora, _ = load_lora_for_models(on, None, lora, 1.0, 0.0)
        assert not torch.equal(sample(comfy, on_lora, pos, neg), sample(comfy, on, pos, neg))
    assert "lora key not loaded" not in caplog.text.lower()


def test_long_prompts_repeated_to_batch_length_are_recognised(comfy, engine, tiny_model):
    """A 154-token positive batched with a 77-token negative: ComfyUI repeats the negative;
    a 77-token positive next to a 154-token negative is repeated and must still match."""
    plain, pos, _ = conds(length=77)
    _, _, long_neg = conds(seed=9, length=154)
    ad = fresh_adapter(engine, tiny_model)
    force_router(ad, True)
    moa = engine[2].apply_moa(tiny_model, ad, bind(engine, plain))
    sample(comfy, moa, pos, long_neg)
    assert moa.get_attachment("moa").recorder.layers, "the repeated 77-token prompt was not recognised"


def test_identity_tokens_reach_the_personalized_attention_of_a_repeated_prompt(comfy, engine, tiny_model):
    """An adapter with 2 identity tokens per subject: the fused prompt is the 77 rows plus one
    token. Batched beside a 154-token negative, ComfyUI repeats the positive to 154 rows; MoA
    must still recognise it and give the layers the repeated prompt plus the token, and the
    picture must depend on that token."""
    from comfyui_moa.moa_attention.engine.fusion import fuse_prompt
    plain, pos, _ = conds(length=77)
    _, _, long_neg = conds(seed=9, length=154)
    ad = engine[0].init_adapter_from_unet(tiny_model.get_model_object("diffusion_model"), rank=4, identity_tokens=2)
    perturb(ad)
    force_router(ad, True)
    with torch.no_grad():
        fused = fuse_prompt(ad.fusion, plain, [([5], torch.randn(768))])
    assert fused.shape == (78, 768)
    repeated = bind(engine, plain, fused)[0].fused_like(torch.cat([plain, plain]))
    assert repeated.shape == (155, 768) and torch.equal(repeated[77:154], fused[:77]) and torch.equal(repeated[154], fused[77])
    other = fused.clone()
    other[77] += 3.0
    pictures = []
    for f in (fused, other):
        moa = engine[2].apply_moa(tiny_model, ad, bind(engine, plain, f))
        pictures.append(sample(comfy, moa, pos, long_neg))
        assert moa.get_attachment("moa").recorder.layers, "the repeated 77-token prompt was not recognised"
    assert (pictures[0] - pictures[1]).abs().max() > 1e-3, "the identity token after the prompt changed nothing"


def test_a_prompt_schedule_reads_the_timestep_the_sampler_runs_at(comfy, engine, tiny_model):
    """An adapter whose fused prompt depends on the timestep and layer: every attn2 layer of the
    positive row gets the timestep of the sampler's step (model_sampling.timestep of its sigma),
    and the schedule changes the picture."""
    from comfy.samplers import calculate_sigmas
    plain, pos, neg = conds()
    ad = engine[0].init_adapter_from_unet(tiny_model.get_model_object("diffusion_model"), rank=4, prompt_schedule=True)
    perturb(ad)
    force_router(ad, True)
    fused = plain.clone()
    fused[3] += 2.0
    fresh = sample(comfy, engine[2].apply_moa(tiny_model, ad, bind(engine, plain, fused)), pos, neg)
    ad.prompt_schedule.out.weight.data.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
    seen, gain = [], ad.prompt_schedule.gain
    ad.prompt_schedule.gain = lambda timesteps, layer: seen.append((timesteps.tolist(), layer)) or gain(timesteps, layer)
    scheduled = sample(comfy, engine[2].apply_moa(tiny_model, ad, bind(engine, plain, fused)), pos, neg)
    sampling = tiny_model.get_model_object("model_sampling")
    steps = sampling.timestep(calculate_sigmas(sampling, "normal", STEPS)[:-1]).tolist()
    attn2 = [i for i, s in enumerate(ad.config.layers) if s.kind == "attn2"]
    assert seen == [([t], layer) for t in steps for layer in attn2]
    assert (scheduled - fresh).abs().max() > 1e-3, "the trained schedule changed nothing"


def tiny_controlnet(unet_config: dict, seed: int = 5):
    """A ControlNet of the tiny UNet's shape, through ComfyUI's own classes."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management
    import comfy.ops
    from support.model_factory import init_weights_
    cfg = {k: v for k, v in unet_config.items() if k not in ("transformer_depth_output", "dtype")}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, device="cpu", **cfg)
    init_weights_(net, seed)
    return comfy.controlnet.ControlNet(net, load_device=comfy.model_management.get_torch_device())


def test_controlnet_composes_with_moa(comfy, engine, tiny_model, tiny_unet_config):
    nodes = comfy[0]
    plain, pos, neg = conds()
    hint = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(0))
    cpos, cneg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, tiny_controlnet(tiny_unet_config),
                                                                  hint, 1.0, 0.0, 1.0)
    base = sample(comfy, tiny_model, pos, neg)
    with_cn = sample(comfy, tiny_model, cpos, cneg)
    assert not torch.equal(with_cn, base)
    ad = trained_looking_adapter(engine, tiny_model)
    zero = engine[2].apply_moa(tiny_model, ad, bind(engine, plain), strength=0.0)
    assert torch.equal(sample(comfy, zero, cpos, cneg), with_cn)        # ControlNet untouched by MoA
    on = engine[2].apply_moa(tiny_model, ad, bind(engine, plain))
    both = sample(comfy, on, cpos, cneg)
    assert not torch.equal(both, with_cn) and not torch.equal(both, sample(comfy, on, pos, neg))
    assert on.get_attachment("moa").recorder.layers, "the controlled prompt was not recognised"


def test_other_attention_patches_compose_with_moa(comfy, engine, tiny_model):
    """A global attn1 patch (sees and edits the hidden states) and an attn2 replace patch on one
    block (ComfyUI then bypasses that module's forward: that layer runs the prior only)."""
    from comfy.ldm.modules.attention import optimized_attention
    plain, pos, neg = conds()

    def attn1_patch(n, context, value, extra_options):
        return n * 0.9, context, value

    def attn2_replace(q, k, v, extra_options):
        return optimized_attention(q, k, v, extra_options["n_heads"]) * 1.1

    other = tiny_model.clone()
    other.set_model_attn1_patch(attn1_patch)
    other.set_model_attn2_replace(attn2_replace, "middle", 0)
    ref = sample(comfy, other, pos, neg)
    assert not torch.equal(ref, sample(comfy, tiny_model, pos, neg))
    ad = trained_looking_adapter(engine, tiny_model)
    assert torch.equal(sample(comfy, engine[2].apply_moa(other, ad, bind(engine, plain), strength=0.0), pos, neg),
                       ref)
    on = engine[2].apply_moa(other, ad, bind(engine, plain))
    out = sample(comfy, on, pos, neg)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    layers = on.get_attachment("moa").recorder.layers
    assert "middle_block.1.transformer_blocks.0.attn2" not in layers       # replaced by the other patch
    assert "middle_block.1.transformer_blocks.0.attn1" in layers
