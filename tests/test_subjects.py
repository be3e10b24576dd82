"""Subjects and the multimodal prompt, in-process with the real tiny checkpoint's CLIP and the
CLIP ViT-L/14 vision model, through the pack's own node classes."""
from __future__ import annotations

import pytest
import torch

PROMPT = "a photo of a man and a dog at the beach"


@pytest.fixture(scope="module")
def loaded(comfy, models_base):
    nodes, pack = comfy
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[:3]
    clip_vision = nodes.CLIPVisionLoader().load_clip("tiny_clip_vision_vit_l14.safetensors")[0]
    return model, clip, clip_vision


@pytest.fixture(scope="module")
def photos():
    from skimage import data
    person = torch.from_numpy(data.astronaut()).float()[None] / 255
    cat = torch.from_numpy(data.chelsea()).float()[None] / 255
    pmask = torch.zeros(1, 512, 512)
    pmask[:, 60:480, 100:360] = 1
    cmask = torch.zeros(1, 300, 451)
    cmask[:, 40:280, 90:350] = 1
    return {"man": (person, pmask), "dog": (cat, cmask), "cat": (cat, cmask), "woman": (person, pmask)}


def subjects_for(pack, photos, words, regions=None):
    from comfyui_moa.nodes.subject import MoASubject
    subs = None
    for i, w in enumerate(words):
        img, mask = photos[w]
        region = None if regions is None else regions[i]
        subs = MoASubject().build(img, w, mask=mask, region=region, previous=subs)[0]
    return subs


def adapter_for(model, seed=0):
    from comfyui_moa.moa_attention.engine.adapter import init_adapter_from_unet
    ad = init_adapter_from_unet(model.get_model_object("diffusion_model"), expert="full", seed=seed)
    g = torch.Generator().manual_seed(seed)
    ad.fusion.fc2.weight.data.normal_(0, 0.05, generator=g)      # a fusion MLP that does something
    for w in ad.layers.values():
        w.router.fc2.bias.data = torch.tensor([0.0, 1.0])
    from comfyui_moa.moa_attention.comfyui.adapters import LoadedAdapter
    return LoadedAdapter(ad, "test-adapter")


def test_token_binding_handles_bpe_repeats_weights_and_long_prompts(loaded):
    from comfyui_moa.moa_attention.comfyui.prompt import token_chunks, word_tokens
    from comfyui_moa.moa_attention.engine.prompt_tokens import ClassWordError, bind_subjects
    _, clip, _ = loaded
    dachshund = word_tokens(clip, "labradoodle")
    assert len(dachshund.ids) > 1, "pick a word that BPE splits"
    _, chunks = token_chunks(clip, "a labradoodle on a sofa")
    (pos,) = bind_subjects(chunks, [dachshund])
    assert pos == list(range(2, 2 + len(dachshund.ids)))

    man = word_tokens(clip, "man")
    _, chunks = token_chunks(clip, "a man talking to a (man:1.3) in a bar")
    first, second = bind_subjects(chunks, [man, man])
    assert first == [2] and second[0] > first[0]

    long_prompt = "a very " * 45 + "detailed photo of a man"
    _, chunks = token_chunks(clip, long_prompt)
    assert len(chunks) == 2
    (pos,) = bind_subjects(chunks, [man])
    assert pos[0] >= 77 and chunks[1][pos[0] - 77] == man.ids[0]

    with pytest.raises(ClassWordError, match=r"'giraffe' is not in the prompt.*tokens are: \['a', 'man'"):
        bind_subjects(token_chunks(clip, "a man")[1], [word_tokens(clip, "giraffe")],
                      describe_tokens=lambda c: __import__("comfyui_moa.moa_attention.comfyui.prompt",
                                                           fromlist=["describe"]).describe(clip, c))


def test_personal_expert_gets_fused_tokens_and_the_prior_plain_ones(comfy, pack, loaded, photos, monkeypatch):
    from comfyui_moa.moa_attention.engine.experts import PersonalExpert
    from comfyui_moa.nodes.apply import MoAApply
    nodes = comfy[0]
    model, clip, clip_vision = loaded
    ad = adapter_for(model)
    subs = subjects_for(pack, photos, ["man", "dog"])
    patched, positive = MoAApply().apply(model, ad, clip, clip_vision, subs, PROMPT, 1.0, 0.0, 1.0, "soft")
    negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    plain = positive[0][0][0]
    controller = patched.get_attachment("moa")
    (binding,) = controller.bindings
    assert torch.equal(binding.plain, plain)

    personal_contexts, prior_contexts = [], []
    original_project, original_rows = PersonalExpert.project, PersonalExpert.project_rows

    def seen(name, x):
        if name == "to_k" and x.shape[1] == 77:
            personal_contexts.append(x.detach().clone())

    def spy(self, name, x, prior, prior_result=None):
        seen(name, x)
        return original_project(self, name, x, prior, prior_result)

    def spy_rows(self, name, x, prior, batch, rows):     # cross-attention k/v go through project_rows
        if x.shape[1:] != batch.shape[1:] or x.shape == batch.shape:
            return original_rows(self, name, x, prior, batch, rows)   # it calls project: seen there
        seen(name, x)
        return original_rows(self, name, x, prior, batch, rows)
    monkeypatch.setattr(PersonalExpert, "project", spy)
    monkeypatch.setattr(PersonalExpert, "project_rows", spy_rows)
    attn2 = next(p for p in (s.path for s in controller.adapter.config.layers) if p.endswith("attn2"))
    prior_module = patched.get_model_object(f"diffusion_model.{attn2}").prior_module
    hook = prior_module.to_k.register_forward_pre_hook(lambda m, args: prior_contexts.append(args[0].clone()))
    try:
        latent = {"samples": torch.zeros(1, 4, 8, 8)}
        nodes.common_ksampler(patched, 0, 1, 4.0, "euler", "normal", positive, negative, latent)
    finally:
        hook.remove()

    from comfyui_moa.moa_attention.comfyui.prompt import token_chunks, word_tokens
    from comfyui_moa.moa_attention.engine.prompt_tokens import bind_subjects
    _, chunks = token_chunks(clip, PROMPT)
    man_pos, dog_pos = bind_subjects(chunks, [word_tokens(clip, "man"), word_tokens(clip, "dog")])
    subject_positions = set(man_pos + dog_pos)
    assert personal_contexts, "the personalized expert never ran"
    ctx = personal_contexts[0][0].float()
    for i in range(77):
        if i in subject_positions:
            assert not torch.allclose(ctx[i], plain[i].float()), f"token {i} should be fused"
            assert torch.allclose(ctx[i], binding.fused[i].float())
        else:
            assert torch.equal(ctx[i], plain[i].float()), f"token {i} should stay plain"
    # prior: the batch's cond row is the plain prompt, the uncond row the negative prompt
    batch = prior_contexts[0]
    rows = {tuple(batch[r, :2, :4].flatten().tolist()) for r in range(batch.shape[0])}
    assert tuple(plain[:2, :4].float().flatten().tolist()) in rows
    assert tuple(negative[0][0][0, :2, :4].float().flatten().tolist()) in rows


def test_three_subjects_sample_and_strength_zero_is_the_base_model(comfy, pack, loaded, photos):
    from comfyui_moa.nodes.apply import MoAApply
    nodes = comfy[0]
    model, clip, clip_vision = loaded
    prompt = "a man, a woman and a cat on a bench"
    subs = subjects_for(pack, photos, ["man", "woman", "cat"])
    ad = adapter_for(model)
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    base = nodes.common_ksampler(model, 3, 2, 4.0, "euler", "normal",
                                 nodes.CLIPTextEncode().encode(clip, prompt)[0], negative, latent)[0]["samples"]
    zero, pos = MoAApply().apply(model, ad, clip, clip_vision, subs, prompt, 0.0, 0.0, 1.0, "soft")
    out0 = nodes.common_ksampler(zero, 3, 2, 4.0, "euler", "normal", pos, negative, latent)[0]["samples"]
    assert torch.equal(out0, base)
    on, pos = MoAApply().apply(model, ad, clip, clip_vision, subs, prompt, 1.0, 0.0, 1.0, "hard")
    out1 = nodes.common_ksampler(on, 3, 2, 4.0, "euler", "normal", pos, negative, latent)[0]["samples"]
    assert not torch.equal(out1, base)
    assert len(on.get_attachment("moa").recorder.layers) == len(ad.config.layers)


def test_region_restricts_the_router_maps(comfy, pack, loaded, photos):
    from comfyui_moa.nodes.apply import MoAApply
    from comfyui_moa.nodes.router_maps import MoARouterMaps
    nodes = comfy[0]
    model, clip, clip_vision = loaded
    region = torch.zeros(1, 64, 64)
    region[:, :, :32] = 1
    subs = subjects_for(pack, photos, ["man"], regions=[region])
    ad = adapter_for(model)
    patched, pos = MoAApply().apply(model, ad, clip, clip_vision, subs, "a man on a hill", 1.0, 0.0, 1.0, "soft")
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    out = nodes.common_ksampler(patched, 1, 2, 4.0, "euler", "normal", pos, negative,
                                {"samples": torch.zeros(1, 4, 8, 8)})[0]
    mask, overlay = MoARouterMaps().maps(patched, out, "all layers")
    assert mask.shape == (1, 64, 64) and overlay.shape == (1, 64, 64, 3)
    assert mask[:, :, 40:].max() < 0.05          # right of the region: prior only (up to interpolation)
    assert mask[:, :, :24].min() > 0.5           # inside: the router's share, ~0.73 here
    attn1_only = MoARouterMaps().maps(patched, out, "self-attention (attn1)")[0]
    assert attn1_only.shape == mask.shape


def test_clear_errors_for_wrong_encoder_model_and_subjects(comfy, pack, loaded, photos, tiny_model):
    from comfyui_moa.nodes.apply import MoAApply
    from comfyui_moa.nodes.subject import MoASubject
    model, clip, clip_vision = loaded
    ad = adapter_for(model)
    subs = subjects_for(pack, photos, ["man"])
    ad.config.image_dim = 1024                  # as an adapter made for a ViT-H image encoder would say
    with pytest.raises(ValueError, match=r"clip_vision gives 768-d image embeddings, but the adapter expects"):
        MoAApply().apply(model, ad, clip, clip_vision, subs, "a man", 1.0, 0.0, 1.0, "soft")
    ad.config.image_dim = 768
    sd2 = tiny_model.clone()
    sd2.model.model_config.unet_config = dict(sd2.model.model_config.unet_config, context_dim=1024)
    try:
        with pytest.raises(ValueError, match=r"MoA adapters run on SD1\.5 or SDXL models\. Load an SD1\.5 or SDXL checkpoint"):
            MoAApply().apply(sd2, ad, clip, clip_vision, subs, "a man", 1.0, 0.0, 1.0, "soft")
    finally:
        sd2.model.model_config.unet_config["context_dim"] = 768
    with pytest.raises(ValueError, match=r"does not fit"):      # a UNet of other widths
        MoAApply().apply(tiny_model, ad, clip, clip_vision, subs, "a man", 1.0, 0.0, 1.0, "soft")
    img, mask = photos["man"]
    with pytest.raises(ValueError, match=r"class_word must be one word"):
        MoASubject().build(img, "old man", mask=mask)
    with pytest.raises(ValueError, match=r"region mask is empty"):
        MoASubject().build(img, "man", mask=mask, region=torch.zeros(1, 64, 64))


def test_a_batch_of_reference_photos_is_one_identity(pack, loaded, photos):
    """Several photos of a subject in one IMAGE input (one mask for all, or one each) are
    encoded one by one and averaged."""
    from comfyui_moa.moa_attention.comfyui.subjects import subject_feature
    from comfyui_moa.nodes.subject import MoASubject
    _, _, clip_vision = loaded
    img, mask = photos["man"]
    flipped = img.flip(2)
    batch = torch.cat([img, flipped])
    (subject,) = MoASubject().build(batch, "man", mask=mask)[0]          # one mask broadcast to both
    assert subject.masks.shape == (2, 512, 512)
    both = subject_feature(clip_vision, subject.images, subject.masks, "t")
    one = subject_feature(clip_vision, img, mask, "t")
    other = subject_feature(clip_vision, flipped, mask, "t")
    assert torch.allclose(both, (one + other) / 2, atol=1e-4)
    assert not torch.allclose(one, other, atol=1e-4)


def test_trainer_and_moa_apply_fuse_the_same_context(comfy, pack, loaded, photos, tmp_path):
    """One subject-preparation path: the trainer's dataset encoding and MoA Apply give the same
    fused context, bit for bit, for the same photo, mask, class word and prompt."""
    import json

    import numpy as np
    from PIL import Image

    from comfyui_moa.moa_attention.comfyui.subjects import fused_context
    from comfyui_moa.moa_attention.training.config import TrainConfig
    from comfyui_moa.moa_attention.training.dataset import read_manifest
    from comfyui_moa.moa_attention.training.encode import encode_record
    from comfyui_moa.nodes.apply import MoAApply
    model, clip, clip_vision = loaded
    img, mask = photos["man"]
    (tmp_path / "ref.png").write_bytes(b"")
    Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8)).save(tmp_path / "ref.png")
    Image.fromarray((mask[0].numpy() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    prompt = "a photo of a man at the beach"
    row = {"image": "ref.png", "caption": prompt, "subjects": [
        {"class_word": "man", "mask": "mask.png", "references": ["ref.png"], "reference_masks": ["mask.png"]}]}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(row) + "\n")
    (record,), problems = read_manifest(tmp_path)
    assert not problems
    cfg = TrainConfig(base=tmp_path, clip_vision=tmp_path, data=tmp_path, output_dir=tmp_path, resolution=64)
    nodes = comfy[0]
    vae = nodes.CheckpointLoaderSimple().load_checkpoint("tiny_sd15.safetensors")[2]
    example = encode_record(cfg, record, model, clip, vae, clip_vision)

    loaded_adapter = adapter_for(model)
    with torch.no_grad():
        trained_on = fused_context(loaded_adapter.adapter.fusion, example.text, example.positions, example.features)
    # the node path, from the same files as the graph's Load Image / Load Image (as Mask) give them
    photo = torch.from_numpy(np.asarray(Image.open(tmp_path / "ref.png").convert("RGB"), np.float32) / 255)[None]
    photo_mask = torch.from_numpy(np.asarray(Image.open(tmp_path / "mask.png"), np.float32) / 255)[None]
    subs = pack.nodes.subject.MoASubject().build(photo, "man", mask=photo_mask)[0]
    patched, positive = MoAApply().apply(model, loaded_adapter, clip, clip_vision, subs, prompt, 1.0, 0.0, 1.0,
                                         "soft")
    (binding,) = patched.get_attachment("moa").bindings
    assert torch.equal(example.text, positive[0][0][0].float())
    assert not torch.equal(binding.fused, binding.plain), "the fusion MLP must change the class word's token"
    assert torch.equal(trained_on, binding.fused)
