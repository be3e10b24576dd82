"""The paper's applications, in-process on tiny models: per-subject regions (checked at the
attention level), subject morphing, DDIM inversion for subject swap."""
from __future__ import annotations

import pytest
import torch

from test_moa_patch import bind, conds, sample, trained_looking_adapter
from test_subjects import adapter_for, loaded, photos, subjects_for  # noqa: F401  (fixtures)

PROMPT = "a photo of a man and a dog at the beach"


@pytest.fixture
def engine(pack):
    from comfyui_moa.moa_attention.comfyui import batch, patch
    from comfyui_moa.moa_attention.engine import adapter, call_state, layer
    return adapter, batch, patch, layer, call_state


# --------------------------------------------------------------------------------------------------
# per-subject regions


def _attn2_layer(engine, model):
    adapter, _, comfy_patch, layer, _ = engine
    ad = trained_looking_adapter(engine, model)
    dm = model.get_model_object("diffusion_model")
    spec = next(s for s in adapter.find_attention_layers(dm) if s.kind == "attn2")
    prior = comfy_patch.original_attention(model, spec.path)
    return spec, prior, layer.MoAAttention(prior, ad.layer(spec.path), spec.path)


def _two_regions(h, w):
    a, b = torch.zeros(h, w), torch.zeros(h, w)
    a[:, : w // 3] = 1.0              # subject A: left third
    b[:, 2 * w // 3:] = 1.0           # subject B: right third; the middle third belongs to nobody
    return a, b


@pytest.mark.parametrize("hard", [False, True])
def test_each_subject_reaches_only_its_own_region_at_the_attention_level(engine, tiny_model, hard):
    """attn2 of a real UNet layer: pixels in A's region depend on A's fused tokens only, B's on B's,
    pixels outside both regions are the prior's output bit for bit."""
    _, _, _, _, call_state = engine
    spec, prior, moa_layer = _attn2_layer(engine, tiny_model)
    h = w = 9
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, h * w, spec.query_dim, generator=g)
    plain = torch.randn(1, 77, 768, generator=g)
    ctx_a, ctx_b = plain.clone(), plain.clone()
    ctx_a[:, 5] += torch.randn(768, generator=g) * 3          # A's class word fused
    ctx_b[:, 8] += torch.randn(768, generator=g) * 3          # B's class word fused
    a, b = _two_regions(h, w)

    def run(cb, regions=(a, b), contexts=None):
        contexts = contexts if contexts is not None else torch.stack([ctx_a, cb], dim=1)
        regions = torch.stack(list(regions))[None]
        state = call_state.CallState(
            rows=torch.tensor([0]), personal_context=contexts[:, 0], regions=regions.sum(1, keepdim=True).clamp(0, 1),
            latent_index=[0], settings=call_state.MoASettings(hard=hard), latent_hw=(h, w),
            subject_contexts=contexts, subject_regions=regions)
        with torch.no_grad():
            return moa_layer(x, context=plain, transformer_options={call_state.STATE_KEY: state,
                                                                   "activations_shape": [1, spec.query_dim, h, w]})

    with torch.no_grad():
        ref = prior(x, context=plain)
    out = run(ctx_b)
    in_a, in_b = a.flatten().bool(), b.flatten().bool()
    nobody = ~(in_a | in_b)
    assert torch.equal(out[:, nobody], ref[:, nobody]), "outside every region the layer must be the prior"
    assert (out[:, in_a] - ref[:, in_a]).abs().max() > 1e-3 and (out[:, in_b] - ref[:, in_b]).abs().max() > 1e-3

    other_b = ctx_b.clone()
    other_b[:, 8] += 5.0                                      # another subject B
    out2 = run(other_b)
    assert torch.equal(out2[:, in_a], out[:, in_a]), "A's pixels saw B's tokens"
    assert (out2[:, in_b] - out[:, in_b]).abs().max() > 1e-3, "B's pixels must see B's tokens"

    # A's pixels get exactly what A alone (one subject, same region) gives them
    alone = run(None, regions=(a,), contexts=ctx_a[:, None])
    assert torch.equal(out[:, in_a], alone[:, in_a])


def test_router_map_of_each_subject_is_zero_outside_its_region(comfy, engine, tiny_model):
    plain, pos, neg = conds()
    ad = trained_looking_adapter(engine, tiny_model)
    hw = 16
    la, lb = _two_regions(hw, hw)
    a, b = (r.repeat_interleave(8, 0).repeat_interleave(8, 1) for r in (la, lb))   # the same, in image space
    fa, fb = plain.clone(), plain.clone()
    fa[3] += 1.0
    fb[6] += 1.0
    binding = engine[1].SubjectBinding(plain=plain, fused=plain.clone(), region=(a + b).clamp(0, 1),
                                       subject_fused=torch.stack([fa, fb]), subject_regions=torch.stack([a, b]))
    moa = engine[2].apply_moa(tiny_model, ad, [binding])
    sample(comfy, moa, pos, neg, hw=hw)
    rec = moa.get_attachment("moa").recorder
    for i, region in enumerate((la, lb)):
        m = rec.subject_average(i)[0]
        assert m.shape == (hw, hw)
        assert m[region == 0].abs().max().item() == 0.0, f"subject {i + 1} leaks outside its region"
        assert m[region == 1].min().item() > 0.5               # the router sends these pixels to the subject
    allmap = rec.average()[0]
    assert allmap[(la + lb) == 0].max().item() < allmap[(la + lb) == 1].min().item()


def test_regions_go_through_moa_apply_and_bad_regions_are_refused(pack, loaded, photos):
    from comfyui_moa.moa_attention.engine.errors import MoAInputError
    from comfyui_moa.nodes.apply import MoAApply
    model, clip, clip_vision = loaded
    ad = adapter_for(model)
    a, b = _two_regions(64, 64)
    subs = subjects_for(pack, photos, ["man", "dog"], regions=[a, b])
    patched, _ = MoAApply().apply(model, ad, clip, clip_vision, subs, PROMPT, 1.0, 0.0, 1.0, "soft")
    (binding,) = patched.get_attachment("moa").bindings
    assert binding.subject_fused.shape == (2, 77, 768) and binding.subject_regions.shape == (2, 64, 64)
    # each subject's prompt fuses only its own class word: it equals the all-subjects prompt there
    changed = [(binding.subject_fused[s] != binding.plain).any(-1).nonzero().flatten().tolist() for s in range(2)]
    assert changed[0] and changed[1] and not set(changed[0]) & set(changed[1])
    for s in range(2):
        assert torch.equal(binding.subject_fused[s][changed[s]], binding.fused[changed[s]])

    overlapping = subjects_for(pack, photos, ["man", "dog"], regions=[a, torch.ones(64, 64)])
    with pytest.raises(MoAInputError, match=r"MoA Apply: the regions of MoA Subject 'man' and MoA Subject 'dog' "
                                            r"overlap \(\d+ pixels\)"):
        MoAApply().apply(model, ad, clip, clip_vision, overlapping, PROMPT, 1.0, 0.0, 1.0, "soft")
    partial = subjects_for(pack, photos, ["man", "dog"], regions=[a, None])
    with pytest.raises(MoAInputError, match=r"MoA Subject 'dog' has none: give every subject its own region"):
        MoAApply().apply(model, ad, clip, clip_vision, partial, PROMPT, 1.0, 0.0, 1.0, "soft")


# --------------------------------------------------------------------------------------------------
# morphing


def _render(comfy, loaded, subs, latent, seed=3):
    from comfyui_moa.nodes.apply import MoAApply
    nodes = comfy[0]
    model, clip, clip_vision = loaded
    ad = adapter_for(model)
    patched, positive = MoAApply().apply(model, ad, clip, clip_vision, subs, "a photo of a man", 1.0, 0.0, 1.0, "soft")
    negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    return nodes.common_ksampler(patched, seed, 2, 4.0, "euler", "normal", positive, negative, latent)[0]["samples"]


def test_morph_ends_reproduce_the_pure_subjects_and_sequence_gives_one_image_per_factor(comfy, pack, loaded, photos):
    from comfyui_moa.moa_attention.engine.errors import MoAInputError
    from comfyui_moa.nodes.morph import MoASubjectMorph
    from comfyui_moa.nodes.subject import MoASubject
    person, pmask = photos["man"]
    cat, cmask = photos["cat"]
    sub_a = MoASubject().build(person, "man", mask=pmask)[0]
    sub_b = MoASubject().build(cat, "man", mask=cmask)[0]
    empty = {"samples": torch.zeros(1, 4, 8, 8)}
    pure_a = _render(comfy, loaded, sub_a, empty)
    pure_b = _render(comfy, loaded, sub_b, empty)
    assert not torch.equal(pure_a, pure_b)
    node = MoASubjectMorph()
    for factor, pure in ((0.0, pure_a), (1.0, pure_b)):
        subs, latent, text = node.morph(sub_a, sub_b, empty, "single", factor, 8)
        assert latent["samples"].shape[0] == 1
        assert torch.equal(_render(comfy, loaded, subs, latent), pure), f"factor {factor} is not the pure subject"
    half = _render(comfy, loaded, node.morph(sub_a, sub_b, empty, "single", 0.5, 8)[0], empty)
    assert not torch.equal(half, pure_a) and not torch.equal(half, pure_b)

    subs, latent, text = node.morph(sub_a, sub_b, empty, "sequence", 0.5, 4)
    assert text == "0, 0.333, 0.667, 1" and latent["batch_index"] == [0, 0, 0, 0]
    frames = _render(comfy, loaded, subs, latent)
    assert frames.shape[0] == 4, "one image per factor"
    # same noise for every frame: a batch of pure A is four identical pictures, and the sequence's ends
    # are the pure subjects rendered in that same batch
    same = _render(comfy, loaded, node.morph(sub_a, sub_a, empty, "sequence", 0.5, 4)[0], latent)
    assert all(torch.equal(same[0], same[i]) for i in range(4))
    assert torch.equal(frames[0], same[0])
    pure_b4 = _render(comfy, loaded, node.morph(sub_b, sub_b, empty, "sequence", 0.5, 4)[0], latent)
    assert torch.equal(frames[3], pure_b4[3])
    # and match the single render up to float rounding of the batch-4 matmuls
    assert torch.allclose(frames[0], pure_a[0], rtol=1e-4, atol=1e-3)
    assert len({tuple(f.flatten()[:16].tolist()) for f in frames}) == 4

    with pytest.raises(MoAInputError, match=r"morph factors must be in \[0, 1\]"):
        node.morph(sub_a, sub_b, empty, "single", 1.5, 8)
    with pytest.raises(MoAInputError, match=r"mismatched subjects: subject_a has 2 subject\(s\), subject_b 1"):
        node.morph(sub_a + sub_a, sub_b, empty, "single", 0.5, 8)
    with pytest.raises(MoAInputError, match=r"at least 2 frames"):
        node.morph(sub_a, sub_b, empty, "sequence", 0.5, 1)


def test_morph_over_a_latent_batch_gives_one_sequence_per_latent_with_that_latents_noise(comfy, pack, loaded,
                                                                                          photos, caplog):
    """2 latents x 3 factors = 6 pictures, latent-major; each latent's frames share its noise (a morph of A into A
    is 3 equal pictures per latent), the two latents keep different noise; 'single' keeps the batch; a sampler
    given another latent renders no sequence and the console says so once."""
    from comfyui_moa.nodes.morph import MoASubjectMorph
    from comfyui_moa.nodes.subject import MoASubject
    sub_a = MoASubject().build(photos["man"][0], "man", mask=photos["man"][1])[0]
    sub_b = MoASubject().build(photos["cat"][0], "man", mask=photos["cat"][1])[0]
    two = {"samples": torch.zeros(2, 4, 8, 8)}
    node = MoASubjectMorph()
    subs, latent, _ = node.morph(sub_a, sub_b, two, "sequence", 0.5, 3)
    assert latent["batch_index"] == [0, 0, 0, 1, 1, 1] and latent["samples"].shape[0] == 6
    frames = _render(comfy, loaded, subs, latent)
    same = _render(comfy, loaded, node.morph(sub_a, sub_a, two, "sequence", 0.5, 3)[0], latent)
    assert frames.shape[0] == 6
    for lat in (0, 1):
        assert all(torch.equal(same[3 * lat], same[3 * lat + i]) for i in (1, 2)), "one noise per latent"
        assert torch.equal(frames[3 * lat], same[3 * lat]), "factor 0 of each latent is the pure subject A"
    assert (same[0] - same[3]).abs().max() > 1e-3, "the two latents must keep different noise"
    assert (frames[0] - frames[2]).abs().max() > 1e-3, "the factors must differ"

    single_subs, single, _ = node.morph(sub_a, sub_b, {"samples": torch.zeros(3, 4, 8, 8)}, "single", 0.0, 8)
    assert single["samples"].shape[0] == 3
    assert torch.equal(_render(comfy, loaded, single_subs, single), _render(comfy, loaded, sub_a, single))

    caplog.set_level("WARNING", logger="comfyui-moa")
    _render(comfy, loaded, subs, {"samples": torch.zeros(1, 4, 8, 8)})
    said = [r.getMessage() for r in caplog.records if "MoA Subject Morph made" in r.getMessage()]
    assert len(said) == 1 and "renders 1 latent(s), but MoA Subject Morph made 6 for its 3 factors" in said[0], said
    caplog.clear()
    _render(comfy, loaded, subs, latent)
    assert not [r for r in caplog.records if "MoA Subject Morph made" in r.getMessage()]


def test_nan_inputs_and_region_batches_are_refused_by_name(comfy, pack, loaded, photos, tiny_model):
    from comfyui_moa.moa_attention.engine.errors import MoAInputError
    from comfyui_moa.nodes.evaluate import MoAEvaluate
    from comfyui_moa.nodes.inversion import MoAInvertPhoto
    from comfyui_moa.nodes.morph import MoASubjectMorph
    from comfyui_moa.nodes.subject import MoASubject
    person, pmask = photos["man"]
    bad = person.clone()
    bad[0, 3, 4, 1] = float("nan")
    with pytest.raises(MoAInputError, match=r"^MoA Subject 'man': image has 1 non-finite value\(s\) \(1 NaN, 0 inf\)"):
        MoASubject().build(bad, "man", mask=pmask)
    inf_mask = pmask.clone()
    inf_mask[..., 0, 0] = float("inf")
    with pytest.raises(MoAInputError, match=r"^MoA Subject 'man': mask has 1 non-finite value\(s\) \(0 NaN, 1 inf\)"):
        MoASubject().build(person, "man", mask=inf_mask)
    left, right = torch.zeros(1, 64, 64), torch.zeros(1, 64, 64)
    left[..., :20], right[..., 40:] = 1.0, 1.0
    with pytest.raises(MoAInputError, match=r"^MoA Subject 'man': region is a batch of 2 different masks"):
        MoASubject().build(person, "man", mask=pmask, region=torch.cat([left, right]))
    (sub,) = MoASubject().build(person, "man", mask=pmask, region=torch.cat([left, left]))[0]
    assert torch.equal(sub.region, left[0]), "a batch of one mask repeated is that mask"
    nan_latent = {"samples": torch.full((1, 4, 8, 8), float("nan"))}
    with pytest.raises(MoAInputError, match=r"^MoA Subject Morph: latent\['samples'\] has 256 non-finite"):
        MoASubjectMorph().morph([sub], [sub], nan_latent, "sequence", 0.5, 3)
    _, pos, neg = conds()
    with pytest.raises(MoAInputError, match=r"^MoA Invert Photo: image has 1 non-finite"):
        MoAInvertPhoto().invert(tiny_model, None, bad[:, :64, :64], pos, neg, 2, "normal", 1.0, 0)
    with pytest.raises(MoAInputError, match=r"^MoA Evaluate: baseline has 1 non-finite"):
        MoAEvaluate().evaluate(person, baseline=bad)


def test_evaluate_says_why_numbers_are_missing(comfy, pack):
    from comfyui_moa.nodes.evaluate import MoAEvaluate
    g = torch.Generator().manual_seed(0)
    images, baseline = torch.rand(2, 32, 32, 3, generator=g), torch.rand(2, 32, 32, 3, generator=g)
    mask = torch.zeros(2, 32, 32)
    mask[1, 8:24, 8:24] = 1.0
    text = MoAEvaluate().evaluate(images, baseline=baseline, subject_mask=mask,
                                  samples={"samples": torch.rand(2, 4, 4, 4, generator=g)})["result"][0]
    assert "latent change (samples is connected but baseline_samples is not" in text, text
    assert "subject_mask 1 is empty (no pixel above 0.5): the numbers inside the subject are missing" in text, text
    assert "subject_mask 2" not in text, text


# --------------------------------------------------------------------------------------------------
# DDIM inversion


def _photo_latent(hw=16, seed=0):
    """A smooth latent (like a photo's), not white noise."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, 4, max(hw // 4, 2), max(hw // 4, 2), generator=g)
    return torch.nn.functional.interpolate(z, size=(hw, hw), mode="bilinear", align_corners=False) * 0.8


def reconstruction_error(comfy, model, pos, neg, z0, steps, refine=0):
    from comfyui_moa.moa_attention.comfyui.inversion import invert_latent
    nodes = comfy[0]
    noise = invert_latent(model, pos, neg, {"samples": z0}, steps, "normal", 1.0, refine)
    # regenerate exactly as a user would: KSamplerAdvanced with add_noise disabled
    out = nodes.KSamplerAdvanced().sample(model, "disable", 0, steps, 1.0, "euler", "normal", pos, neg, noise,
                                          0, 10000, "disable")[0]["samples"]
    return (out - z0).abs().mean().item() / z0.abs().mean().item(), noise["samples"]


@pytest.fixture
def smooth_model(comfy):
    """The server tests' tiny checkpoint UNet (320 channels, 1 level) with a small, smooth noise prediction (see
    support.app_graphs.SMOOTH_OUTPUT_SCALE): a random UNet at full output scale is no denoiser."""
    from support.app_graphs import SMOOTH_OUTPUT_SCALE
    from support.model_factory import build_sd15_model_patcher, tiny_unet_config
    model = build_sd15_model_patcher(tiny_unet_config(), seed=0)
    with torch.no_grad():
        model.model.diffusion_model.out[2].weight.mul_(SMOOTH_OUTPUT_SCALE)
    return model


def test_inversion_then_reconstruction_error_shrinks_with_steps(comfy, smooth_model, capsys):
    _, pos, neg = conds()
    z0 = _photo_latent(hw=8)
    errors = {(steps, refine): reconstruction_error(comfy, smooth_model, pos, neg, z0, steps, refine)[0]
              for steps, refine in ((10, 0), (50, 0), (50, 3))}
    with capsys.disabled():
        print("\nDDIM inversion then KSamplerAdvanced (add_noise off), relative mean abs error of the latent: " +
              ", ".join(f"{s} steps{f' + {r} refine' if r else ''}: {e:.4f}" for (s, r), e in errors.items()))
    assert errors[50, 0] < errors[10, 0] / 3, errors
    assert errors[50, 3] < 0.01, errors


def test_moa_strength_zero_regenerates_the_inverted_photo_bit_for_bit(comfy, engine, tiny_model):
    plain, pos, neg = conds()
    from comfyui_moa.moa_attention.comfyui.inversion import invert_latent
    from comfyui_moa.moa_attention.engine.errors import MoAInputError
    nodes = comfy[0]
    inv = invert_latent(tiny_model, pos, neg, {"samples": _photo_latent()}, 5, "normal", 1.0)
    ad = trained_looking_adapter(engine, tiny_model)
    zero = engine[2].apply_moa(tiny_model, ad, bind(engine, plain), strength=0.0)
    on = engine[2].apply_moa(tiny_model, ad, bind(engine, plain))

    def regenerate(m):
        return nodes.KSamplerAdvanced().sample(m, "disable", 0, 5, 1.0, "euler", "normal", pos, neg, inv,
                                               0, 10000, "disable")[0]["samples"]
    base = regenerate(tiny_model)
    assert torch.equal(regenerate(zero), base)
    assert not torch.equal(regenerate(on), base)
    with pytest.raises(MoAInputError, match="invert with the prior"):
        invert_latent(zero, pos, neg, {"samples": _photo_latent()}, 5, "normal", 1.0)


def test_invert_photo_node_validates_its_inputs(comfy, tiny_model):
    """The node refuses what ComfyUI cannot check (a size the latent would crop); the widgets' ranges
    are ComfyUI's, and invert_latent refuses a bad step count for the Python API."""
    from comfyui_moa.moa_attention.comfyui.inversion import invert_latent
    from comfyui_moa.moa_attention.engine.errors import MoAInputError
    from comfyui_moa.nodes.inversion import MoAInvertPhoto
    _, pos, neg = conds()
    node = MoAInvertPhoto()
    with pytest.raises(MoAInputError, match=r"MoA Invert Photo: image size 60x64 is not a multiple of 8.*to 56x64"):
        node.invert(tiny_model, None, torch.zeros(1, 64, 60, 3), pos, neg, 10, "normal", 1.0, 0)
    with pytest.raises(MoAInputError, match=r"^steps must be at least 1, got 0$"):
        invert_latent(tiny_model, pos, neg, {"samples": _photo_latent()}, 0, "normal", 1.0)


def test_renoise_replaces_the_inverted_noise_only_inside_the_subject_mask(comfy, tiny_model):
    """MoA Invert Photo's renoise: outside the mask the inversion bit for bit, inside fresh noise at the
    scale of a txt2img start (sqrt(1 + sigma_max^2)) for renoise 1, a variance-keeping blend below;
    the same seed the same noise; a missing or mis-batched mask refused before the inversion runs."""
    from comfyui_moa.moa_attention.comfyui.inversion import invert_latent
    from comfyui_moa.moa_attention.engine.errors import MoAInputError
    _, pos, neg = conds()
    z0 = _photo_latent(hw=16)
    mask = torch.zeros(1, 128, 128)
    mask[:, 32:96, 32:96] = 1.0                       # the picture's size: the latent's 4..12 square
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4:12, 4:12] = True

    def invert(renoise, seed=0, region=mask):
        return invert_latent(tiny_model, pos, neg, {"samples": z0}, 5, "normal", 1.0, 0, region, renoise,
                             seed)["samples"]
    plain, fresh, half = invert(0.0), invert(1.0), invert(0.5)
    assert torch.equal(fresh[..., ~inside], plain[..., ~inside]) and torch.equal(half[..., ~inside], plain[..., ~inside])
    sigma = float(tiny_model.get_model_object("model_sampling").sigma_max)
    assert fresh[..., inside].std().item() == pytest.approx((1 + sigma ** 2) ** 0.5, rel=0.15)
    corr = torch.corrcoef(torch.stack([fresh[..., inside].flatten(), plain[..., inside].flatten()]))[0, 1]
    assert abs(corr.item()) < 0.2                      # fresh: nothing of the inversion left inside
    expected = 0.5 ** 0.5 * plain[..., inside] + 0.5 ** 0.5 * fresh[..., inside]
    assert torch.allclose(half[..., inside], expected, atol=1e-4)
    assert torch.equal(invert(1.0, seed=0), fresh) and not torch.equal(invert(1.0, seed=1), fresh)
    with pytest.raises(MoAInputError, match="renoise 1.0 needs subject_mask"):
        invert(1.0, region=None)
    with pytest.raises(MoAInputError, match="subject_mask has a batch of 2 for 1 photo"):
        invert(1.0, region=mask.repeat(2, 1, 1))


def test_inversion_sampler_node_plugs_into_sampler_custom(comfy, tiny_model):
    """ComfyUI's own composition: SamplerCustom (add_noise off) + MoA DDIM Inversion Sampler + the sigmas of the
    regeneration gives the same noise as MoA Invert Photo's path, and bad sigmas are refused clearly."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    from comfyui_moa.moa_attention.comfyui.inversion import invert_latent
    from comfyui_moa.moa_attention.engine.errors import MoAInputError
    from comfyui_moa.nodes.inversion import MoADDIMInversionSampler
    _, pos, neg = conds()
    z0 = _photo_latent()
    (sampler,) = MoADDIMInversionSampler().get_sampler(1)
    sigmas = comfy.samplers.calculate_sigmas(tiny_model.get_model_object("model_sampling"), "normal", 6)
    out = SamplerCustom.execute(tiny_model, False, 0, 1.0, pos, neg, sampler, sigmas, {"samples": z0}).args[0]
    ref = invert_latent(tiny_model, pos, neg, {"samples": z0}, 6, "normal", 1.0, refine=1)
    assert torch.equal(out["samples"], ref["samples"])
    with pytest.raises(MoAInputError, match="strictly descending sigmas"):
        SamplerCustom.execute(tiny_model, False, 0, 1.0, pos, neg, sampler, sigmas.flip(0), {"samples": z0})
    # inversion runs the prior: MoA Apply's model is refused, like MoA Invert Photo refuses it
    from comfyui_moa.moa_attention.comfyui.patch import apply_moa
    from comfyui_moa.moa_attention.engine.adapter import init_adapter_from_unet
    plain = pos[0][0][0]
    moa = apply_moa(tiny_model, init_adapter_from_unet(tiny_model.get_model_object("diffusion_model"), rank=2),
                    [engine_binding(plain)])
    with pytest.raises(MoAInputError, match=r"^MoA DDIM Inversion Sampler: model carries a MoA patch; invert with"):
        SamplerCustom.execute(moa, False, 0, 1.0, pos, neg, sampler, sigmas, {"samples": z0})
    with pytest.raises(MoAInputError, match=r"^MoA DDIM Inversion Sampler: the latent to invert has 1 non-finite"):
        SamplerCustom.execute(tiny_model, False, 0, 1.0, pos, neg, sampler, sigmas,
                              {"samples": z0.index_put((torch.tensor([0]),) * 4, torch.tensor(float("inf")))})


def engine_binding(plain):
    from comfyui_moa.moa_attention.comfyui.batch import SubjectBinding
    return SubjectBinding(plain=plain, fused=plain.clone())
