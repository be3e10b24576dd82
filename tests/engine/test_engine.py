"""The engine alone, with plain torch: no ComfyUI is imported here, so these run in seconds
(`bash scripts/dev.sh test tests/engine`). The attention module below has the attributes of
any SD-style attention (to_q/to_k/to_v/to_out, heads); the engine needs nothing more."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from comfyui_moa.moa_attention.engine import adapter_file
from comfyui_moa.moa_attention.engine.adapter import init_adapter_from_unet
from comfyui_moa.moa_attention.engine.call_state import STATE_KEY, CallState, LayerEvent, MoASettings, halving_grid
from comfyui_moa.moa_attention.engine.errors import ClassWordError, MoAError, MoAInputError, SubjectImageError
from comfyui_moa.moa_attention.engine.fusion import fuse_prompt, identity_rows, stack_prompts
from comfyui_moa.moa_attention.engine.layer import MoAAttention, install_layers
from comfyui_moa.moa_attention.engine.prompt_tokens import WordTokens, bind_subjects
from comfyui_moa.moa_attention.engine.router import apply_strength, hard_route
from comfyui_moa.moa_attention.engine.router_maps import RouterRecorder
from comfyui_moa.moa_attention.engine.subject_images import check_images_and_masks, crop_subject

from support.sd_attention import CTX, DIM, Attention, TinyNet, force_router, perturb, run


def state_for(x, fused, settings=None, regions=None, observers=()):
    return CallState.whole_batch(fused, (8, 8), settings, observers=observers, regions=regions)


@pytest.fixture
def net():
    return TinyNet().eval()


@pytest.mark.parametrize("expert", ["lowrank", "full"])
@pytest.mark.parametrize("hard", [False, True])
def test_fresh_adapter_routed_to_the_expert_is_the_prior_bit_for_bit(net, expert, hard):
    x, ctx = torch.randn(2, 64, DIM), torch.randn(2, 5, CTX)
    with torch.no_grad():
        base = net(x, ctx)
    ad = init_adapter_from_unet(net, expert=expert, rank=4, seed=0)
    assert [s.path for s in ad.config.layers] == ["blocks.0.attn1", "blocks.0.attn2", "blocks.1.attn1",
                                                  "blocks.1.attn2"]
    force_router(ad, personal=True)
    out = run(net, ad, x, ctx, state_for(x, ctx, MoASettings(hard=hard)))
    assert torch.equal(out, base)


class CrossOnly(nn.Module):
    """One SD-sized cross-attention (320 channels, a 768-d prompt) for the bf16 test below."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Module()
        self.block.attn2 = Attention(320, 768, heads=5)


@pytest.mark.parametrize("expert", ["lowrank", "full"])
@pytest.mark.parametrize("hard", [False, True])
def test_fresh_adapter_in_bf16_is_the_prior_bit_for_bit_for_a_part_of_the_batch(expert, hard):
    """Only the cond row of an [uncond, cond] batch is personalized. bf16 CPU matmuls split
    their sums by matrix shape (with several threads, a 231 x 768 @ 768 x 320 product differs
    in the last bit from the same rows taken out of a batch of 2), so the expert must run the
    prior's projections on the prior's shapes to reproduce it."""
    m = CrossOnly().to(torch.bfloat16).eval()
    x, ctx = torch.randn(2, 256, 320).bfloat16(), torch.randn(2, 231, 768).bfloat16()
    with torch.no_grad():
        base = m.block.attn2(x, context=ctx)
    ad = init_adapter_from_unet(m, expert=expert, rank=4, seed=0)
    force_router(ad, personal=True)
    state = CallState.whole_batch(ctx[1:], (16, 16), MoASettings(hard=hard), first_row=1)
    uninstall = install_layers(m, ad)
    try:
        with torch.no_grad():
            out = m.block.attn2(x, context=ctx, transformer_options={STATE_KEY: state})
    finally:
        uninstall()
    assert ad.layer("block.attn2").router(x[1:].float()).eq(1.0).all()       # every pixel to the expert
    assert torch.equal(out, base)


def test_strength_zero_and_a_prior_router_give_the_prior_exactly(net):
    x, ctx = torch.randn(2, 64, DIM), torch.randn(2, 5, CTX)
    with torch.no_grad():
        base = net(x, ctx)
    ad = init_adapter_from_unet(net, rank=4)
    perturb(ad)
    force_router(ad, personal=True)
    assert (run(net, ad, x, ctx, state_for(x, ctx + 1)) - base).abs().max() > 1e-3
    assert torch.equal(run(net, ad, x, ctx, state_for(x, ctx + 1, MoASettings(strength=0.0))), base)
    force_router(ad, personal=False)
    assert (run(net, ad, x, ctx, state_for(x, ctx + 1)) - base).abs().max() < 1e-6
    # the layers are swapped back: the net is the prior again
    with torch.no_grad():
        assert torch.equal(net(x, ctx), base)


def test_regions_keep_pixels_outside_exactly_prior_on_every_layer(net):
    x, ctx = torch.randn(1, 64, DIM), torch.randn(1, 5, CTX)
    ad = init_adapter_from_unet(net, rank=4)
    perturb(ad)
    force_router(ad, personal=True)
    region = torch.zeros(1, 1, 8, 8)
    region[..., :, :4] = 1.0
    layer = MoAAttention(net.blocks[0].attn2, ad.layer("blocks.0.attn2"), "blocks.0.attn2")
    with torch.no_grad():
        ref = net.blocks[0].attn2(x, context=ctx)
        out = layer(x, context=ctx, transformer_options={STATE_KEY: state_for(x, ctx + 1, regions=region)})
    inside = region.flatten().bool()
    assert torch.equal(out[:, ~inside], ref[:, ~inside])
    assert (out[:, inside] - ref[:, inside]).abs().max() > 1e-3


def test_observers_see_every_layer_and_router_maps_average_them(net):
    x, ctx = torch.randn(2, 64, DIM), torch.randn(2, 5, CTX)
    ad = init_adapter_from_unet(net, rank=4)
    events: list[LayerEvent] = []
    recorder = RouterRecorder()
    run(net, ad, x, ctx, state_for(x, ctx, observers=(events.append, recorder)))
    assert [e.path for e in events] == [s.path for s in ad.config.layers]
    assert [e.hw for e in events] == [(8, 8), (8, 8), (4, 4), (4, 4)]
    assert all(e.query is not None and e.key is not None for e in events)      # soft path: q/k for the trainer
    assert events[1].key.shape[1] == 5                                          # attn2 keys: the prompt tokens
    maps = recorder.average()
    assert maps.shape == (2, 8, 8)
    fresh_share = torch.softmax(torch.tensor([4.0, 0.0]), 0)[1].item()          # a fresh router's margin
    assert maps.mean().item() == pytest.approx(fresh_share, rel=0.05)


def test_strength_scales_the_share_and_hard_routing_is_top1():
    share = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.equal(apply_strength(share, 0.0), torch.zeros(4))
    assert torch.equal(apply_strength(share, 1.0), share)
    s3 = apply_strength(share, 3.0)
    assert s3[0] == 0 and s3[-1] == 1 and s3[1] == pytest.approx(0.5)
    assert torch.equal(hard_route(share), torch.tensor([0.0, 0.0, 0.0, 1.0]))


def test_fusion_changes_only_the_bound_tokens_and_a_fresh_one_changes_nothing(net):
    ad = init_adapter_from_unet(net, rank=4)
    plain, feature = torch.randn(7, 768), torch.randn(768)
    assert torch.equal(fuse_prompt(ad.fusion, plain, [([2, 3], feature)]), plain)
    ad.fusion.fc2.weight.data.normal_(0, 0.1)
    fused = fuse_prompt(ad.fusion, plain, [([2, 3], feature)])
    changed = (fused != plain).any(dim=1)
    assert changed.tolist() == [False, False, True, True, False, False, False]


def test_identity_tokens_follow_the_prompt_one_set_per_subject(net):
    """tokens=3: each subject's first token replaces its class word(s) as with one token, its two
    further tokens (fused at its last class-word position) follow the prompt in subject order."""
    ad = init_adapter_from_unet(net, rank=4, identity_tokens=3)
    plain, fa, fb = torch.randn(7, 768), torch.randn(768), torch.randn(768)
    fresh = fuse_prompt(ad.fusion, plain, [([2, 3], fa), ([5], fb)])
    assert fresh.shape == (11, 768) and torch.equal(fresh[:7], plain)
    assert torch.equal(fresh[7:9], plain[[3, 3]]) and torch.equal(fresh[9:], plain[[5, 5]])   # fresh: text copies
    ad.fusion.fc2.weight.data.normal_(0, 0.1)
    fused = fuse_prompt(ad.fusion, plain, [([2, 3], fa), ([5], fb)])
    tokens = ad.fusion(plain[[3]], fa)[0]                                     # [3, 768] of subject A's last word token
    close = dict(atol=1e-5, rtol=1e-5)                                         # one row vs two: matmul rounding
    assert torch.allclose(fused[3], tokens[0], **close) and torch.allclose(fused[7:9], tokens[1:], **close)
    assert torch.allclose(fused[9:], ad.fusion(plain[[5]], fb)[0, 1:], **close)
    assert not torch.allclose(fused[7], fused[8], atol=1e-3), "the further tokens are distinct"
    assert (fused[:7] != plain).any(dim=1).tolist() == [False, False, True, True, False, True, False]
    assert identity_rows([[2, 3], [5]], 7, 3) == [[2, 3, 7, 8], [5, 9, 10]]
    assert identity_rows([[2, 3], [5]], 7, 1) == [[2, 3], [5]]


def test_prompts_with_fewer_identity_tokens_are_padded_with_their_last_prompt_row():
    one, two = torch.randn(5, 4), torch.randn(7, 4)           # prompts of 4 rows + 1 and + 3 identity tokens
    stacked = stack_prompts([one, two], 4)
    assert stacked.shape == (2, 7, 4) and torch.equal(stacked[1], two) and torch.equal(stacked[0, :5], one)
    assert torch.equal(stacked[0, 5:], one[[3, 3]]), "padding repeats the last prompt row, never an identity token"
    assert torch.equal(stack_prompts([one, one], 4), torch.stack([one, one]))


def test_class_words_bind_left_to_right_and_refuse_with_the_tokens():
    man, dog = WordTokens("man", (10,)), WordTokens("dog", (20, 21))
    chunks = [[0, 5, 10, 6, 20, 21, 6, 10, 1]]
    assert bind_subjects(chunks, [man, dog, man]) == [[2], [4, 5], [7]]
    with pytest.raises(ClassWordError, match=r"3 subjects use the class word 'man'.*only 2 time"):
        bind_subjects(chunks, [man, man, man])
    with pytest.raises(ClassWordError, match="'cat' is not in the prompt"):
        bind_subjects(chunks, [WordTokens("cat", (30,))])


def test_subject_crops_and_their_refusals():
    image = torch.zeros(1, 32, 48, 3)
    mask = torch.zeros(1, 32, 48)
    mask[0, 8:16, 10:30] = 1.0
    image[0, 8:16, 10:30] = 0.5
    masks = check_images_and_masks(image, mask, "subject")
    crop = crop_subject(image[0], masks[0], size=64)
    assert crop.shape == (64, 64, 3)
    assert crop[32, 32].tolist() == pytest.approx([0.5] * 3, abs=1e-3) and crop[0, 0].tolist() == [1.0] * 3
    with pytest.raises(SubjectImageError, match="mask 1 of 1 is empty"):
        check_images_and_masks(image, torch.zeros(1, 32, 48), "subject")
    with pytest.raises(SubjectImageError, match="mask size 8x8 differs from image size 48x32"):
        check_images_and_masks(image, torch.ones(1, 8, 8), "subject")


def test_errors_keep_their_type_when_a_node_prefixes_them():
    err = SubjectImageError("mask 1 of 1 is empty")
    prefixed = err.with_prefix("MoA Subject 'dog'")
    assert type(prefixed) is SubjectImageError and isinstance(prefixed, (MoAError, ValueError))
    assert str(prefixed) == "MoA Subject 'dog': mask 1 of 1 is empty"
    assert prefixed.with_prefix("MoA Subject 'dog'") is prefixed
    with pytest.raises(MoAInputError, match="cannot place 10 tokens"):
        halving_grid(10, (8, 8))
    assert halving_grid(12, (5, 7)) == (3, 4)


def test_adapter_file_round_trip_with_plain_torch(net, tmp_path):
    ad = init_adapter_from_unet(net, expert="full", seed=2)
    perturb(ad)
    path = adapter_file.save_adapter(ad, tmp_path / "a.safetensors", dtype=torch.float32)
    back = adapter_file.load_adapter(path)
    assert back.config.layers == ad.config.layers
    for (k, a), (_, b) in zip(sorted(ad.state_dict().items()), sorted(back.state_dict().items())):
        assert torch.equal(a, b), k
    with pytest.raises(FileExistsError):
        adapter_file.save_adapter(ad, path)


def test_metrics_auroc_and_change_inside_outside():
    from comfyui_moa.moa_attention.scoring.metrics import auroc, change_inside_outside, cosine, psnr
    labels = torch.tensor([0, 0, 1, 1])
    assert auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert auroc(torch.full((4,), 0.3), labels) == 0.5            # a uniform share is chance, whatever its level
    assert auroc(torch.tensor([0.1, 0.5, 0.5, 0.9]), labels) == pytest.approx(0.875)
    a = torch.zeros(1, 4, 8, 8)
    b = a.clone()
    mask = torch.zeros(8, 8)
    mask[:4] = 1
    b[..., :4, :] += 2.0
    b[..., 4:, :] += 0.5
    inside, outside = change_inside_outside(a, b, mask)
    assert (inside, outside) == (2.0, 0.5)
    assert psnr(a, a) == float("inf") and psnr(a, b, 1 - mask, peak=1.0) == pytest.approx(10 * math.log10(1 / 0.25))
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0])) == pytest.approx(1.0)


def test_sequence_latents_repeat_each_latent_in_a_row_with_its_batch_index_and_noise_mask():
    from comfyui_moa.moa_attention.engine.errors import MoAInputError
    from comfyui_moa.moa_attention.engine.morph import sequence_latents
    samples = torch.arange(2.0)[:, None, None, None].expand(2, 4, 3, 3).clone()
    mask = torch.stack([torch.zeros(1, 3, 3), torch.ones(1, 3, 3)])
    out = sequence_latents({"samples": samples, "batch_index": [5, 7], "noise_mask": mask, "extra": 1}, 3)
    assert out["batch_index"] == [5, 5, 5, 7, 7, 7] and out["extra"] == 1
    assert out["samples"][:, 0, 0, 0].tolist() == [0, 0, 0, 1, 1, 1]
    assert out["noise_mask"][:, 0, 0, 0].tolist() == [0, 0, 0, 1, 1, 1]
    one_mask = sequence_latents({"samples": samples, "noise_mask": mask[1:]}, 2)     # one mask for all latents
    assert one_mask["batch_index"] == [0, 0, 1, 1] and one_mask["noise_mask"].shape[0] == 4
    with pytest.raises(MoAInputError, match=r"batch_index has 1 entries for 2 latents"):
        sequence_latents({"samples": samples, "batch_index": [0]}, 2)


def test_require_finite_names_the_input_and_counts_nan_and_inf():
    from comfyui_moa.moa_attention.engine.errors import MoAInputError
    from comfyui_moa.moa_attention.engine.finite import require_finite
    require_finite("image", torch.zeros(2, 2))
    require_finite("latent", {"samples": torch.zeros(1, 4, 2, 2), "batch_index": [0]})
    require_finite("indices", torch.tensor([1, 2]))
    t = torch.zeros(3)
    t[0], t[2] = float("nan"), float("-inf")
    with pytest.raises(MoAInputError, match=r"^mask has 2 non-finite value\(s\) \(1 NaN, 1 inf\) of 3\. The node"):
        require_finite("mask", t)
    with pytest.raises(MoAInputError, match=r"^latent\['noise_mask'\] has 1 non-finite"):
        require_finite("latent", {"samples": torch.zeros(1), "noise_mask": t[:1]})
