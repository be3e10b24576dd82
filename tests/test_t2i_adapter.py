"""The stock T2I-Adapter path (a .safetensors file through ComfyUI's ControlNet loader, ControlNetApplyAdvanced,
the stock sampler) together with MoA, in-process on a tiny SD1.5 UNet. ComfyUI adds T2I features to the last
input block of each UNet level, so this needs SD1.5's full 4-level, 2-res-blocks-per-level layout (the suite's
1-level tiny UNet never receives them)."""
from __future__ import annotations

import logging

import pytest
import torch

from test_moa_patch import bind, conds, sample, trained_looking_adapter

LEVELS = 4                    # SD1.5 full T2I-Adapter: one feature map per UNet level (channel_mult 1, 2, 4, 4)
MODEL_CHANNELS = 32
HINT_CHANNELS = 3             # an RGB hint (depth/canny-style adapters); cin = 3 * 8 * 8 after PixelUnshuffle(8)


@pytest.fixture
def engine(pack):
    from comfyui_moa.moa_attention.comfyui import batch, patch
    from comfyui_moa.moa_attention.engine import adapter, call_state, layer
    return adapter, batch, patch, layer, call_state


def sd15_layout_config() -> dict:
    """SD1.5's UNet layout (2 res blocks per level, no attention at the deepest level) at width 32."""
    from support.model_factory import tiny_unet_config
    cfg = tiny_unet_config(model_channels=MODEL_CHANNELS, levels=LEVELS, transformer_depth_middle=True)
    cfg.update(num_res_blocks=[2] * LEVELS, transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
               transformer_depth_output=[1] * 9 + [0] * 3)       # popped from the end: deepest level first
    return cfg


def write_t2i_adapter(path, seed: int = 11):
    """An SD1.5 full T2I-Adapter (original TencentARC key layout: conv_in.*, body.N.{in_conv,block1,block2}.*)
    built with ComfyUI's own class, channels matching the tiny UNet's levels; ksize 1 and average-pool
    downsampling (no down_opt convs) as in the released SD1.x adapters."""
    import comfy.t2i_adapter.adapter
    from support.model_factory import _save_atomic, _to_dtype, init_weights_
    ad = comfy.t2i_adapter.adapter.Adapter(
        cin=HINT_CHANNELS * 64, channels=[MODEL_CHANNELS * m for m in (1, 2, 4, 4)], nums_rb=2, ksize=1, sk=True,
        use_conv=False, xl=False)
    init_weights_(ad, seed)
    return _save_atomic(_to_dtype(ad.state_dict(), torch.float16), path)


def test_t2i_adapter_composes_with_moa(comfy, engine, tmp_path, caplog):
    from comfy import controlnet                      # not `import comfy.controlnet`: `comfy` is the fixture
    from support.model_factory import build_sd15_model_patcher
    nodes = comfy[0]
    model = build_sd15_model_patcher(sd15_layout_config(), seed=0)
    path = write_t2i_adapter(tmp_path / "tiny_t2iadapter_sd15.safetensors")
    with caplog.at_level(logging.DEBUG):
        t2i = controlnet.load_controlnet(str(path))                   # what ControlNetLoader calls
    assert isinstance(t2i, controlnet.T2IAdapter) and not t2i.t2i_model.xl
    assert t2i.channels_in == HINT_CHANNELS
    assert "t2i missing" not in caplog.text and "t2i unexpected" not in caplog.text

    plain, pos, neg = conds()
    hint = torch.rand(1, 128, 128, 3, generator=torch.Generator().manual_seed(0))    # IMAGE, 8x the latent
    tpos, tneg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, t2i, hint, 1.0, 0.0, 1.0)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        base = sample(comfy, model, pos, neg)
        with_t2i = sample(comfy, model, tpos, tneg)
        # every feature map landed on a block of its shape (apply_control only warns on a mismatch)
        assert "control could not be applied" not in caplog.text
        assert not torch.equal(with_t2i, base), "the T2I-Adapter must change the sampled latent"

        ad = trained_looking_adapter(engine, model)
        zero = engine[2].apply_moa(model, ad, bind(engine, plain), strength=0.0)
        assert torch.equal(sample(comfy, zero, tpos, tneg), with_t2i), "MoA at strength 0 must leave T2I untouched"

        on = engine[2].apply_moa(model, ad, bind(engine, plain))
        both = sample(comfy, on, tpos, tneg)
        assert torch.isfinite(both).all()
        assert not torch.equal(both, with_t2i), "MoA at strength 1 must change the T2I result"
        assert not torch.equal(both, sample(comfy, on, pos, neg)), "the T2I-Adapter must still act under MoA"
        assert on.get_attachment("moa").recorder.layers, "the controlled prompt was not recognised"
        assert "control could not be applied" not in caplog.text
