"""Between runs ComfyUI unloads and offloads models (other models loaded in between, memory
pressure, `unload_all_models()`): the MoA adapter must be loaded and unloaded with its UNet,
and a run after any of that must equal a fresh one, bit for bit."""
from __future__ import annotations

import torch

STEPS = 3


def sample(comfy, model, positive, negative, seed: int = 5):
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    return comfy[0].common_ksampler(model, seed, STEPS, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]


def loaded_patchers():
    import comfy.model_management as mm
    return [lm.model for lm in mm.current_loaded_models if lm.model is not None]


def test_adapter_follows_the_unet_through_unloads_and_other_models(comfy, pack, tiny_model, tiny_unet_config):
    import comfy.model_management as mm

    from comfyui_moa.moa_attention.comfyui.adapters import LoadedAdapter
    from comfyui_moa.moa_attention.comfyui.batch import SubjectBinding
    from comfyui_moa.moa_attention.comfyui.patch import apply_moa
    from comfyui_moa.moa_attention.engine.adapter import init_adapter_from_unet
    from support.model_factory import build_sd15_model_patcher

    g = torch.Generator().manual_seed(0)
    plain, neg = torch.randn(77, 768, generator=g), torch.randn(77, 768, generator=g)
    positive, negative = [[plain[None].clone(), {}]], [[neg[None], {}]]
    adapter = init_adapter_from_unet(tiny_model.get_model_object("diffusion_model"), rank=4, seed=0)
    for w in adapter.layers.values():               # trained-looking: personal != prior, router half-decided
        for p in w.expert.parameters():
            p.data.add_(torch.randn(p.shape, generator=g) * 0.2)
        w.router.fc2.bias.data = torch.tensor([0.0, 1.0])
    loaded = LoadedAdapter(adapter, "model-management")
    fused = plain.clone()
    fused[4] += 1.0
    moa = apply_moa(tiny_model, loaded, [SubjectBinding(plain=plain, fused=fused)])
    adapter_patcher = loaded.patcher(moa.load_device, moa.offload_device)

    base = sample(comfy, tiny_model, positive, negative)
    first = sample(comfy, moa, positive, negative)
    assert (first - base).abs().max() > 1e-3, "the adapter must change the result"
    assert any(p is adapter_patcher for p in loaded_patchers()), "the adapter was not loaded with the UNet"

    mm.unload_all_models()
    assert not any(p is adapter_patcher for p in loaded_patchers()), "the adapter stayed loaded after unloading"
    assert all(t.device == torch.device(moa.offload_device) for t in adapter.parameters())
    assert torch.equal(sample(comfy, moa, positive, negative), first)

    other = build_sd15_model_patcher(tiny_unet_config, seed=3)      # another model loaded in between
    sample(comfy, other, positive, negative)
    mm.free_memory(1e30, mm.get_torch_device())                     # as ComfyUI does under memory pressure
    assert torch.equal(sample(comfy, moa, positive, negative), first)

    fresh = apply_moa(tiny_model, loaded, [SubjectBinding(plain=plain, fused=fused)])
    assert torch.equal(sample(comfy, fresh, positive, negative), first)
    assert torch.equal(sample(comfy, tiny_model, positive, negative), base), "the original model was changed"
    assert all(t.device == torch.device(moa.load_device) for t in adapter.parameters())


def test_repeated_apply_moa_with_one_bare_adapter_reuses_one_patcher_and_never_leaks(comfy, pack, tiny_model,
                                                                                     caplog):
    """The Python API with a bare MoAAdapter: 20 apply_moa + sample calls share one adapter ModelPatcher, so
    ComfyUI never sees a patcher die while its model lives (its 'memory leak' message and full garbage
    collection); and the adapter is freed with its last user."""
    import gc
    import weakref

    from comfyui_moa.moa_attention.comfyui.batch import SubjectBinding
    from comfyui_moa.moa_attention.comfyui.patch import apply_moa
    from comfyui_moa.moa_attention.engine.adapter import init_adapter_from_unet

    plain, neg = torch.randn(77, 768, generator=torch.Generator().manual_seed(1)), torch.zeros(77, 768)
    positive, negative = [[plain[None].clone(), {}]], [[neg[None], {}]]
    adapter = init_adapter_from_unet(tiny_model.get_model_object("diffusion_model"), rank=2, seed=0)
    caplog.set_level("INFO")
    patchers = set()
    for i in range(20):
        moa = apply_moa(tiny_model, adapter, [SubjectBinding(plain=plain, fused=plain + 0.1)], strength=0.5 + i / 40)
        patchers.update(id(p) for p in moa.get_additional_models_with_key("moa"))
        sample(comfy, moa, positive, negative, seed=i)
        del moa
    adapter_patchers = [p for p in loaded_patchers() if p.model is adapter]
    assert len(patchers) == 1 and len(adapter_patchers) == 1, (len(patchers), len(adapter_patchers))
    leaks = [r.getMessage() for r in caplog.records if "memory leak" in r.getMessage()]
    assert not leaks, leaks[:2]

    gone = weakref.ref(adapter)
    del adapter, adapter_patchers
    gc.collect()
    assert gone() is None, "the adapter outlived its last user"
