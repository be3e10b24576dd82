"""The prompt schedule (the fused prompt conditioned on timestep and layer), with plain torch."""
from __future__ import annotations

import pytest
import torch

from comfyui_moa.moa_attention.engine import adapter_file
from comfyui_moa.moa_attention.engine.adapter import init_adapter_from_unet
from comfyui_moa.moa_attention.engine.call_state import CallState
from comfyui_moa.moa_attention.engine.errors import AdapterFileError, MoAInputError
from comfyui_moa.moa_attention.engine.fusion import fuse_prompt

from support.sd_attention import CTX, TinyNet, force_router, perturb, run

POSITION = 2                     # the class word's row in the 5-row test prompt


def trained(net, schedule: bool, seed: int = 3):
    """An adapter that changes the picture: expert, fusion and router as if trained."""
    ad = init_adapter_from_unet(net, rank=4, seed=seed, text_dim=CTX, image_dim=8, fusion_hidden=12,
                                prompt_schedule=schedule)
    perturb(ad)
    force_router(ad, True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ad.fusion.fc2.weight.normal_(0.0, 0.5, generator=g)
    return ad


def perturb_schedule(ad) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        ad.prompt_schedule.out.weight.normal_(0.0, 0.5, generator=g)


def prompts(ad, batch: int = 2):
    plain = torch.randn(batch, 5, CTX, generator=torch.Generator().manual_seed(4))
    feature = torch.randn(8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fused = torch.stack([fuse_prompt(ad.fusion, p, [([POSITION], feature)]) for p in plain])
    return plain, fused


def picture(net, ad, plain, fused, timesteps):
    x = torch.randn(plain.shape[0], 64, 16, generator=torch.Generator().manual_seed(6))
    return run(net, ad, x, plain, CallState.whole_batch(fused, (8, 8), timesteps=timesteps))


def test_a_fresh_schedule_gives_the_unconditioned_prompt():
    net = TinyNet().eval()
    with_schedule, without = trained(net, True), trained(net, False)
    without.load_state_dict({k: v for k, v in with_schedule.state_dict().items() if not k.startswith("prompt_")})
    plain, fused = prompts(with_schedule)
    for t in (0.0, 500.0, 999.0):
        timesteps = torch.full((2,), t)
        assert torch.allclose(picture(net, with_schedule, plain, fused, timesteps),
                              picture(net, without, plain, fused, None), atol=1e-6, rtol=0)


def test_a_trained_schedule_changes_the_identity_tokens_by_timestep_and_layer_and_nothing_else():
    net = TinyNet().eval()
    ad = trained(net, True)
    perturb_schedule(ad)
    plain, fused = prompts(ad)
    schedule = ad.prompt_schedule
    at = {(t, layer): schedule.apply(fused, plain, torch.full((2,), t), layer) for t in (100.0, 900.0) for layer in (0, 3)}
    others = [r for r in range(5) if r != POSITION]
    for prompt in at.values():
        assert torch.equal(prompt[:, others], plain[:, others])
    identity = {k: p[:, POSITION] for k, p in at.items()}
    change = (fused[:, POSITION] - plain[:, POSITION]).abs().mean()
    assert (identity[(100.0, 0)] - identity[(900.0, 0)]).abs().mean() > 0.05 * change
    assert (identity[(100.0, 0)] - identity[(100.0, 3)]).abs().mean() > 0.05 * change
    timesteps = torch.tensor([100.0, 900.0])
    mixed = schedule.apply(fused, plain, timesteps, 0)
    assert torch.allclose(mixed[1], at[(900.0, 0)][1], atol=1e-6), "each row takes its own timestep"
    assert (picture(net, ad, plain, fused, timesteps) - picture(net, ad, plain, fused, timesteps.flip(0))).abs().max() > 1e-4


def test_one_gain_serves_every_region_prompt_as_apply_would_alone():
    ad = trained(TinyNet().eval(), True)
    perturb_schedule(ad)
    plain, fused = prompts(ad)
    longer = torch.cat([fused, fused[:, POSITION:POSITION + 1] * 2.0], dim=1)   # a second identity token
    timesteps = torch.tensor([100.0, 900.0])
    schedule = ad.prompt_schedule
    each = schedule.apply_each([fused, longer], plain, timesteps, 1)
    assert torch.equal(each[0], schedule.apply(fused, plain, timesteps, 1))
    assert torch.equal(each[1], schedule.apply(longer, plain, timesteps, 1))
    assert torch.equal(each[1][:, 5:], longer[:, 5:]), "tokens after the prompt are not scheduled"
    assert (each[0][:, POSITION] - fused[:, POSITION]).abs().max() > 1e-3, "the gain changed the identity token"


def test_a_scheduled_adapter_without_timesteps_is_refused():
    net = TinyNet().eval()
    ad = trained(net, True)
    plain, fused = prompts(ad)
    with pytest.raises(MoAInputError, match=r"^this MoA adapter's prompt depends on the timestep, but the caller did "
                                            r"not say which timestep the UNet runs at: set CallState\.timesteps$"):
        picture(net, ad, plain, fused, None)


def for_file(net, schedule: bool = True):
    """An adapter whose header is an SD1.5 adapter's (768-d text and image features)."""
    ad = init_adapter_from_unet(net, rank=4, seed=3, prompt_schedule=schedule)
    if schedule:
        perturb_schedule(ad)
    return ad


def test_a_scheduled_adapter_round_trips_in_format_4(tmp_path):
    net = TinyNet().eval()
    ad = for_file(net)
    path = adapter_file.save_adapter(ad, tmp_path / "s.safetensors", dtype=torch.float32)
    meta = adapter_file.read_adapter_metadata(path)
    assert (meta["moa.format_version"], meta["moa.prompt_schedule"]) == ("4", "timestep_layer")
    back = adapter_file.load_adapter(path)
    assert back.config.prompt_schedule and back.layer(back.config.layers[3].path).schedule is back.prompt_schedule
    for k, v in ad.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    timesteps = torch.tensor([100.0, 900.0])
    assert torch.equal(back.prompt_schedule.gain(timesteps, 3), ad.prompt_schedule.gain(timesteps, 3))
    plain_file = adapter_file.save_adapter(for_file(net, schedule=False), tmp_path / "p.safetensors")
    assert "moa.prompt_schedule" not in adapter_file.read_adapter_metadata(plain_file)


@pytest.mark.parametrize("version, name, message", [
    ("3", "timestep_layer", r"prompt schedule 'timestep_layer' in a format 3 header \('none', or 'timestep_layer' "
                            r"from format 4 on\)\. Re-export the adapter with the MoA trainer"),
    ("4", "per_pixel", r"prompt schedule 'per_pixel' in a format 4 header"),
])
def test_a_header_with_a_schedule_it_cannot_hold_is_refused(tmp_path, version, name, message):
    from safetensors.torch import load_file, save_file
    net = TinyNet().eval()
    path = adapter_file.save_adapter(for_file(net), tmp_path / "s.safetensors")
    meta = {**adapter_file.read_adapter_metadata(path), "moa.format_version": version, "moa.prompt_schedule": name}
    edited = tmp_path / "edited.safetensors"
    save_file(load_file(str(path)), str(edited), metadata=meta)
    with pytest.raises(AdapterFileError, match=message):
        adapter_file.load_adapter(edited)
