"""Regenerate workflows/*.json by building each graph in the real ComfyUI graph editor.

Not needed at test time (the workflows are committed as static JSON); run it only to change them:

    bash scripts/dev.sh run                                # in one terminal (serves on 127.0.0.1:8188)
    .venv/bin/python scripts/make_workflows.py [--url http://127.0.0.1:8188]

It opens the editor in headless Chromium (Debian: chromium + chromium-driver; `bash scripts/dev.sh setup`
installs them), adds the nodes with LiteGraph.createNode / app.graph.add / node.connect, sets the widgets,
lays the nodes out in columns with groups, and saves JSON.stringify(app.graph.serialize()).
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.browser import open_editor, start_chromium  # noqa: E402

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
CLIP_VISION = "clip_vision_vit_l14.safetensors"
ADAPTER = "moa_sd15.safetensors"
NEGATIVE = "blurry, lowres, deformed, watermark, text"
SEED = 42
#: MoA Invert Photo's renoise in the swap workflow: fresh noise where the new subject goes
SWAP_RENOISE = 1.0
#: KSampler (Advanced)'s cfg regenerating the swap (the inversion stays at cfg 1): guidance draws the new
#: subject in the renoised region (experiments/toy_world/README.md, "The swap's regeneration")
SWAP_CFG = 3.0


@dataclass(frozen=True)
class Base:
    """The files and picture size of one base model's workflows."""
    checkpoint: str
    adapter: str
    size: int
    note: str


SD15 = Base(CHECKPOINT, ADAPTER, 512, f"""Model files (put them in ComfyUI/models/..., then press R to refresh the lists):
- checkpoints/{CHECKPOINT}: an SD1.5 checkpoint (MoA adapters run on SD1.5 models).
- clip_vision/{CLIP_VISION}: the CLIP ViT-L/14 image encoder the adapter was trained with.
- moa/{ADAPTER}: a MoA adapter (made with `python -m moa_attention.train`).""")

SDXL = Base("sd_xl_base_1.0.safetensors", "moa_sdxl.safetensors", 1024, f"""Model files for SDXL (put them in \
ComfyUI/models/..., then press R to refresh the lists):
- checkpoints/sd_xl_base_1.0.safetensors: the SDXL base 1.0 checkpoint (stabilityai/stable-diffusion-xl-base-1.0) \
or a fine-tune of it; not the refiner.
- clip_vision/{CLIP_VISION}: the image encoder the adapter was trained with (CLIP ViT-L/14 unless its maker says \
otherwise; MoA Apply names the one it expects).
- moa/moa_sdxl.safetensors: a MoA adapter trained on SDXL (`python -m moa_attention.train --base \
sd_xl_base_1.0.safetensors ...`). Adapters are per base: an SD1.5 adapter does not run on SDXL, nor back.
SDXL draws at 1024x1024 (Empty Latent Image); the prompt goes to both of its text encoders.""")

MODELS_NOTE = SD15.note

MASK_NOTE = """Subject mask: 1 = subject. The mask is a black-and-white picture of the same size as the photo, \
white = subject, black = background (read from its red channel by Load Image (as Mask)).
- Cut-out PNG with a transparent background instead? Take Load Image's MASK output through an \
Invert Mask node (ComfyUI's MASK is 1 - alpha, so a cut-out gives 0 on the subject).
- Painted the subject in the Mask Editor (right-click the photo)? Connect Load Image's MASK output directly.
- No mask at all: leave 'mask' unconnected and the whole photo is used."""

USAGE_NOTE = """Each MoA Subject's class word must appear in MoA Apply's prompt. Connect MoA Apply's 'positive' \
to the sampler (MoA recognises its own conditioning there); the negative prompt is an ordinary CLIP Text Encode.
Router map: red = pixels the router sent to the subject expert, blue = pixels the base model draws alone."""


def models(nodes: dict, links: list, col: int = 0, base: Base = SD15) -> None:
    nodes["ckpt"] = dict(type="CheckpointLoaderSimple", col=col, widgets={"ckpt_name": base.checkpoint})
    nodes["clipvision"] = dict(type="CLIPVisionLoader", col=col, widgets={"clip_name": CLIP_VISION})
    nodes["adapter"] = dict(type="MoAAdapterLoader", col=col, widgets={"adapter_name": base.adapter})


def subject(nodes: dict, links: list, name: str, label: str, image: str, mask: str, word: str, col: int,
            previous: str | None = None, region: str | None = None) -> None:
    nodes[f"{name}_img"] = dict(type="LoadImage", col=col, title=f"{label} photo", widgets={"image": image},
                                size=[320, 340])
    nodes[f"{name}_mask"] = dict(type="LoadImageMask", col=col, title=f"{label} mask (white = subject)",
                                 widgets={"image": mask, "channel": "red"}, size=[320, 340])
    if region:
        nodes[f"{name}_region"] = dict(type="LoadImageMask", col=col, title=f"{label} region (white = may appear)",
                                       widgets={"image": region, "channel": "red"}, size=[320, 340])
        links.append((f"{name}_region", 0, name, "region"))
    nodes[name] = dict(type="MoASubject", col=col, title=f"MoA Subject ({word})", widgets={"class_word": word})
    links += [(f"{name}_img", 0, name, "image"), (f"{name}_mask", 0, name, "mask")]
    if previous:
        links.append((previous, 0, name, "previous"))


def apply_and_sample(nodes: dict, links: list, prompt: str, subjects_from: str, col: int,
                     prompt_from: str | None = None, seed_from: str | None = None, sampler: str = "sampler",
                     prefix: str = "MoA/result", save: bool = True, size: int = 512) -> None:
    nodes["apply"] = dict(type="MoAApply", col=col, size=[400, 290], widgets={
        "prompt": prompt, "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, "routing": "soft",
        "sparse_threshold": 0.0})
    nodes["negative"] = dict(type="CLIPTextEncode", col=col, title="Negative prompt", size=[400, 110],
                             widgets={"text": NEGATIVE})
    nodes["latent"] = dict(type="EmptyLatentImage", col=col, widgets={"width": size, "height": size, "batch_size": 1})
    nodes[sampler] = dict(type="KSampler", col=col + 1, title="KSampler (MoA)" if seed_from else None, widgets={
        "seed": SEED, "control_after_generate": "fixed", "steps": 25, "cfg": 7.0, "sampler_name": "euler",
        "scheduler": "normal", "denoise": 1.0})
    nodes["decode"] = dict(type="VAEDecode", col=col + 1)
    nodes["maps"] = dict(type="MoARouterMaps", col=col + 1, widgets={"layers": "all layers", "opacity": 0.5,
                                                                       "subject": 0})
    links += [("ckpt", 0, "apply", "model"), ("adapter", 0, "apply", "moa_adapter"), ("ckpt", 1, "apply", "clip"),
              ("clipvision", 0, "apply", "clip_vision"), (subjects_from, 0, "apply", "subjects"),
              ("ckpt", 1, "negative", "clip"),
              ("apply", 0, sampler, "model"), ("apply", 1, sampler, "positive"), ("negative", 0, sampler, "negative"),
              ("latent", 0, sampler, "latent_image"),
              (sampler, 0, "decode", "samples"), ("ckpt", 2, "decode", "vae"),
              ("apply", 0, "maps", "model"), (sampler, 0, "maps", "samples"), ("decode", 0, "maps", "image")]
    if prompt_from:
        links.append((prompt_from, 0, "apply", "prompt"))
    if seed_from:
        links.append((seed_from, 0, sampler, "seed"))
    if save:
        nodes["save"] = dict(type="SaveImage", col=col + 2, title="Result", size=[420, 470],
                             widgets={"filename_prefix": prefix})
        links.append(("decode", 0, "save", "images"))
    nodes["maps_preview"] = dict(type="PreviewImage", col=col + 3,
                                 title="Router map (red = subject expert, blue = base model)", size=[420, 470])
    links.append(("maps", 1, "maps_preview", "images"))


def single_subject(base: Base = SD15):
    nodes, links = {}, []
    label = "" if base is SD15 else " (SDXL)"
    nodes["note"] = dict(type="Note", col=0, size=[400, 520], title=f"Read me: MoA, one subject{label}",
                         widgets={"text": "\n\n".join([base.note, MASK_NOTE, USAGE_NOTE])})
    models(nodes, links, col=0, base=base)
    subject(nodes, links, "subject", "Subject", "subject.png", "subject_mask.png", "man", col=1)
    apply_and_sample(nodes, links, "a photo of a man hiking in the mountains, golden hour", "subject", col=2,
                     prefix="MoA/single_subject" if base is SD15 else "MoA/sdxl_single_subject", size=base.size)
    groups = [("Models", ["ckpt", "clipvision", "adapter"]), ("Subject", ["subject_img", "subject_mask", "subject"]),
              ("MoA", ["apply", "negative", "latent"]), ("Sample", ["sampler", "decode", "maps"])]
    return nodes, links, groups


def two_subjects():
    nodes, links = {}, []
    nodes["note"] = dict(type="Note", col=0, size=[400, 560], title="Read me: MoA, two subjects", widgets={
        "text": "\n\n".join([MODELS_NOTE, MASK_NOTE, USAGE_NOTE,
                             "Several subjects: chain MoA Subject nodes through 'previous'. Each class word must "
                             "appear in the prompt once per subject that uses it (two dogs: 'a dog and a dog ...'). "
                             "Optional 'region' masks say where each subject may appear in the picture."])})
    models(nodes, links, col=0)
    subject(nodes, links, "man", "Man", "man.png", "man_mask.png", "man", col=1)
    subject(nodes, links, "dog", "Dog", "dog.png", "dog_mask.png", "dog", col=2, previous="man")
    apply_and_sample(nodes, links, "a man and a dog side by side in a park", "dog", col=3, prefix="MoA/two_subjects")
    groups = [("Models", ["ckpt", "clipvision", "adapter"]), ("Subject 1: man", ["man_img", "man_mask", "man"]),
              ("Subject 2: dog", ["dog_img", "dog_mask", "dog"]), ("MoA", ["apply", "negative", "latent"]),
              ("Sample", ["sampler", "decode", "maps"])]
    return nodes, links, groups


def compare_strength():
    nodes, links = {}, []
    prompt = "a photo of a man hiking in the mountains, golden hour"
    nodes["note"] = dict(type="Note", col=0, size=[400, 560], title="Read me: with and without MoA", widgets={
        "text": "\n\n".join([
            "Same prompt, same seed, same sampler: the left picture is the base model alone, the right one "
            "has MoA. The subject changes; the composition, background and lighting (the context) should stay. "
            "The Prompt and Seed nodes feed both branches so they stay equal. Lower MoA Apply's strength (0 = "
            "exactly the base model) or narrow start/end_percent if the subject takes over the picture.",
            MODELS_NOTE, MASK_NOTE])})
    models(nodes, links, col=0)
    nodes["prompt"] = dict(type="PrimitiveStringMultiline", col=1, title="Prompt", size=[320, 120],
                           widgets={"value": prompt})
    nodes["seed"] = dict(type="PrimitiveInt", col=1, title="Seed", widgets={"value": SEED,
                                                                            "control_after_generate": "fixed"})
    subject(nodes, links, "subject", "Subject", "subject.png", "subject_mask.png", "man", col=1)
    apply_and_sample(nodes, links, prompt, "subject", col=2, prompt_from="prompt", seed_from="seed",
                     sampler="sampler", save=False)
    nodes["base_positive"] = dict(type="CLIPTextEncode", col=2, title="Prompt (base model)", size=[400, 110],
                                  widgets={"text": prompt})
    nodes["base_sampler"] = dict(type="KSampler", col=3, title="KSampler (base model)", widgets={
        "seed": SEED, "control_after_generate": "fixed", "steps": 25, "cfg": 7.0, "sampler_name": "euler",
        "scheduler": "normal", "denoise": 1.0})
    nodes["base_decode"] = dict(type="VAEDecode", col=3, title="VAE Decode (base model)")
    nodes["stitch"] = dict(type="ImageStitch", col=4, title="Side by side", widgets={
        "direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"})
    nodes["save"] = dict(type="SaveImage", col=4, title="Left: without MoA, right: with MoA", size=[620, 400],
                         widgets={"filename_prefix": "MoA/compare"})
    links += [("prompt", 0, "base_positive", "text"), ("ckpt", 1, "base_positive", "clip"),
              ("ckpt", 0, "base_sampler", "model"), ("base_positive", 0, "base_sampler", "positive"),
              ("negative", 0, "base_sampler", "negative"), ("latent", 0, "base_sampler", "latent_image"),
              ("seed", 0, "base_sampler", "seed"),
              ("base_sampler", 0, "base_decode", "samples"), ("ckpt", 2, "base_decode", "vae"),
              ("base_decode", 0, "stitch", "image1"), ("decode", 0, "stitch", "image2"),
              ("stitch", 0, "save", "images")]
    nodes["maps_preview"]["col"] = 5
    groups = [("Models", ["ckpt", "clipvision", "adapter"]),
              ("Prompt, seed and subject", ["prompt", "seed", "subject_img", "subject_mask", "subject"]),
              ("Both branches", ["apply", "negative", "latent", "base_positive"]),
              ("Sample", ["sampler", "decode", "maps", "base_sampler", "base_decode"])]
    return nodes, links, groups


def _note(nodes: dict, title: str, *texts: str, height: int = 560) -> None:
    nodes["note"] = dict(type="Note", col=0, size=[400, height], title=title, widgets={"text": "\n\n".join(texts)})


def subject_swap():
    nodes, links = {}, []
    photo_prompt = "a photo of a man standing in front of a rocket"
    _note(nodes, "Read me: swap the subject of a photo",
          "1. MoA Invert Photo turns the photo back into noise with DDIM inversion on the base model, guided by a "
          "prompt that describes the photo. 2. KSampler (Advanced) regenerates from that noise (add_noise disable, the "
          "same steps and scheduler) with MoA and the new subject: the prior keeps the photo's context, the subject "
          "expert draws the new subject. Its cfg 3 draws the new subject in the fresh noise; cfg 1 (the inversion's) "
          "keeps the rest of the photo most exactly, and without MoA (or at strength 0) then gives the photo back.",
          "MoA Apply's prompt must be the photo's prompt (same words; the class word names the subject to swap). "
          "The region (white = the old subject) keeps the new subject where the old one was; the rest stays the "
          "photo's. The region is also MoA Invert Photo's subject_mask: renoise puts fresh noise there, so the old "
          "subject's colours and shape do not come back (0 = the plain inversion; the rest of the photo is kept "
          "either way). More inversion steps (and refine) = closer to the photo. The photo's size must be a multiple of 8.",
          MODELS_NOTE, MASK_NOTE)
    models(nodes, links, col=0)
    nodes["photo"] = dict(type="LoadImage", col=1, title="Photo to edit", widgets={"image": "photo.png"},
                          size=[320, 340])
    nodes["photo_prompt"] = dict(type="CLIPTextEncode", col=1, title="Prompt describing the photo", size=[320, 110],
                                 widgets={"text": photo_prompt})
    nodes["negative"] = dict(type="CLIPTextEncode", col=1, title="Negative prompt", size=[320, 110],
                             widgets={"text": NEGATIVE})
    nodes["invert"] = dict(type="MoAInvertPhoto", col=1, widgets={"steps": 50, "scheduler": "normal", "cfg": 1.0,
                                                                  "refine": 0, "renoise": SWAP_RENOISE, "seed": 0,
                                                                  "control_after_generate": "fixed"})
    subject(nodes, links, "subject", "New subject", "subject.png", "subject_mask.png", "man", col=2,
            region="photo_subject_region.png")
    nodes["apply"] = dict(type="MoAApply", col=3, size=[400, 290], widgets={
        "prompt": photo_prompt, "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0, "routing": "soft",
        "sparse_threshold": 0.0})
    nodes["sampler"] = dict(type="KSamplerAdvanced", col=3, title="KSampler (Advanced): regenerate from the noise",
                            widgets={"add_noise": "disable", "noise_seed": 0, "control_after_generate": "fixed",
                                     "steps": 50, "cfg": SWAP_CFG, "sampler_name": "euler", "scheduler": "normal",
                                     "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"})
    nodes["decode"] = dict(type="VAEDecode", col=4)
    nodes["maps"] = dict(type="MoARouterMaps", col=4, widgets={"layers": "all layers", "opacity": 0.5, "subject": 0})
    nodes["stitch"] = dict(type="ImageStitch", col=4, title="Side by side", widgets={
        "direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"})
    nodes["save"] = dict(type="SaveImage", col=5, title="Left: the photo, right: the subject swapped", size=[620, 400],
                         widgets={"filename_prefix": "MoA/subject_swap"})
    nodes["maps_preview"] = dict(type="PreviewImage", col=6,
                                 title="Router map (red = subject expert, blue = base model)", size=[420, 470])
    links += [("ckpt", 1, "photo_prompt", "clip"), ("ckpt", 1, "negative", "clip"),
              ("ckpt", 0, "invert", "model"), ("ckpt", 2, "invert", "vae"), ("photo", 0, "invert", "image"),
              ("photo_prompt", 0, "invert", "positive"), ("negative", 0, "invert", "negative"),
              ("ckpt", 0, "apply", "model"), ("adapter", 0, "apply", "moa_adapter"), ("ckpt", 1, "apply", "clip"),
              ("clipvision", 0, "apply", "clip_vision"), ("subject", 0, "apply", "subjects"),
              ("apply", 0, "sampler", "model"), ("apply", 1, "sampler", "positive"), ("negative", 0, "sampler", "negative"),
              ("invert", 0, "sampler", "latent_image"), ("subject_region", 0, "invert", "subject_mask"),
              ("sampler", 0, "decode", "samples"), ("ckpt", 2, "decode", "vae"),
              ("apply", 0, "maps", "model"), ("sampler", 0, "maps", "samples"), ("decode", 0, "maps", "image"),
              ("photo", 0, "stitch", "image1"), ("decode", 0, "stitch", "image2"), ("stitch", 0, "save", "images"),
              ("maps", 1, "maps_preview", "images")]
    groups = [("Models", ["ckpt", "clipvision", "adapter"]),
              ("1. Invert the photo (base model)", ["photo", "photo_prompt", "negative", "invert"]),
              ("New subject", ["subject_img", "subject_mask", "subject_region", "subject"]),
              ("2. Regenerate with MoA", ["apply", "sampler"]), ("Result", ["decode", "maps", "stitch"])]
    return nodes, links, groups


def morph():
    nodes, links = {}, []
    _note(nodes, "Read me: morph one subject into another",
          "MoA Subject Morph interpolates the two subjects' image features (and so their fused prompt tokens). "
          "mode 'sequence' renders 'frames' images from subject A (factor 0) to subject B (factor 1) in one run, all "
          "with the same noise, so only the identity changes; the animated PNG plays them. mode 'single' renders one "
          "factor. Factor 0 and 1 are exactly the pure subjects.",
          "Both subjects use subject A's class word in the prompt.", MODELS_NOTE, MASK_NOTE)
    models(nodes, links, col=0)
    subject(nodes, links, "subject_a", "Subject A", "subject.png", "subject_mask.png", "man", col=1)
    subject(nodes, links, "subject_b", "Subject B", "subject_b.png", "subject_b_mask.png", "man", col=2)
    nodes["morph"] = dict(type="MoASubjectMorph", col=3, widgets={"mode": "sequence", "factor": 0.5, "frames": 8})
    apply_and_sample(nodes, links, "a photo of a man reading in a cafe, soft light", "morph", col=3,
                     prefix="MoA/morph")
    links.remove(("latent", 0, "sampler", "latent_image"))
    links += [("subject_a", 0, "morph", "subject_a"), ("subject_b", 0, "morph", "subject_b"),
              ("latent", 0, "morph", "latent"), ("morph", 1, "sampler", "latent_image")]
    nodes["animation"] = dict(type="SaveAnimatedPNG", col=6, title="Morph animation", size=[420, 470],
                              widgets={"filename_prefix": "MoA/morph", "fps": 4.0, "compress_level": 4})
    links.append(("decode", 0, "animation", "images"))
    groups = [("Models", ["ckpt", "clipvision", "adapter"]),
              ("Subject A (factor 0)", ["subject_a_img", "subject_a_mask", "subject_a"]),
              ("Subject B (factor 1)", ["subject_b_img", "subject_b_mask", "subject_b"]),
              ("Morph + MoA", ["morph", "apply", "negative", "latent"]), ("Sample", ["sampler", "decode", "maps"])]
    return nodes, links, groups


def regions(base: Base = SD15):
    nodes, links = {}, []
    label = "" if base is SD15 else " (SDXL)"
    _note(nodes, f"Read me: two subjects, each in its own region{label}",
          "Each MoA Subject gets a region mask (white = where it may appear). Pixels in the man's region attend only "
          "to the man's fused tokens, pixels in the dog's region only to the dog's, and outside both regions the base "
          "model draws alone: the two subjects do not blend. Regions must not overlap; give every subject a region "
          "or none. MoA Router Maps' 'subject' picks one subject's map (0 = all).",
          base.note, MASK_NOTE, USAGE_NOTE)
    models(nodes, links, col=0, base=base)
    subject(nodes, links, "man", "Man", "man.png", "man_mask.png", "man", col=1, region="left_region.png")
    subject(nodes, links, "dog", "Dog", "dog.png", "dog_mask.png", "dog", col=2, previous="man",
            region="right_region.png")
    apply_and_sample(nodes, links, "a man and a dog side by side in a park", "dog", col=3,
                     prefix="MoA/regions" if base is SD15 else "MoA/sdxl_regions", size=base.size)
    groups = [("Models", ["ckpt", "clipvision", "adapter"]),
              ("Subject 1: man, left", ["man_img", "man_mask", "man_region", "man"]),
              ("Subject 2: dog, right", ["dog_img", "dog_mask", "dog_region", "dog"]),
              ("MoA", ["apply", "negative", "latent"]), ("Sample", ["sampler", "decode", "maps"])]
    return nodes, links, groups


def controlnet_pose():
    nodes, links = {}, []
    _note(nodes, "Read me: MoA + ControlNet (pose)",
          "The stock Apply ControlNet node sits between MoA Apply's positive and the sampler: the pose shapes the "
          "layout, MoA puts the subject in it. A T2I-Adapter loads through the same Load ControlNet Model node. "
          "Put an SD1.5 openpose ControlNet in models/controlnet and a pose picture (e.g. from a pose preprocessor) "
          "in the Pose node.", MODELS_NOTE, MASK_NOTE, USAGE_NOTE)
    models(nodes, links, col=0)
    nodes["cn_loader"] = dict(type="ControlNetLoader", col=0,
                              widgets={"control_net_name": "control_v11p_sd15_openpose.safetensors"})
    subject(nodes, links, "subject", "Subject", "subject.png", "subject_mask.png", "man", col=1)
    nodes["pose"] = dict(type="LoadImage", col=1, title="Pose", widgets={"image": "pose.png"}, size=[320, 340])
    apply_and_sample(nodes, links, "a photo of a man dancing on a stage", "subject", col=2, prefix="MoA/controlnet")
    nodes["cn_apply"] = dict(type="ControlNetApplyAdvanced", col=2, widgets={
        "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0})
    links.remove(("apply", 1, "sampler", "positive"))
    links.remove(("negative", 0, "sampler", "negative"))
    links += [("apply", 1, "cn_apply", "positive"), ("negative", 0, "cn_apply", "negative"),
              ("cn_loader", 0, "cn_apply", "control_net"), ("pose", 0, "cn_apply", "image"),
              ("ckpt", 2, "cn_apply", "vae"),
              ("cn_apply", 0, "sampler", "positive"), ("cn_apply", 1, "sampler", "negative")]
    groups = [("Models", ["ckpt", "clipvision", "adapter", "cn_loader"]),
              ("Subject and pose", ["subject_img", "subject_mask", "subject", "pose"]),
              ("MoA + ControlNet", ["apply", "negative", "latent", "cn_apply"]),
              ("Sample", ["sampler", "decode", "maps"])]
    return nodes, links, groups


def style_lora():
    nodes, links = {}, []
    _note(nodes, "Read me: MoA + a style LoRA",
          "The context stays with the base model's branch, so style LoRAs and style words in the prompt keep working "
          "with the subject inserted. The LoRA can be loaded before MoA Apply (as here) or after it (MoA Apply -> "
          "LoraLoaderModelOnly -> KSampler): both apply it to the base model's layers. Put a style LoRA for SD1.5 "
          "in models/loras.", MODELS_NOTE, MASK_NOTE, USAGE_NOTE)
    models(nodes, links, col=0)
    nodes["lora"] = dict(type="LoraLoaderModelOnly", col=0, title="Style LoRA",
                         widgets={"lora_name": "style_lora.safetensors", "strength_model": 0.8})
    subject(nodes, links, "subject", "Subject", "subject.png", "subject_mask.png", "man", col=1)
    apply_and_sample(nodes, links, "an oil painting of a man in a sunflower field, impressionist style, thick "
                     "brush strokes", "subject", col=2, prefix="MoA/style_lora")
    links.remove(("ckpt", 0, "apply", "model"))
    links += [("ckpt", 0, "lora", "model"), ("lora", 0, "apply", "model")]
    groups = [("Models", ["ckpt", "clipvision", "adapter", "lora"]), ("Subject", ["subject_img", "subject_mask", "subject"]),
              ("MoA", ["apply", "negative", "latent"]), ("Sample", ["sampler", "decode", "maps"])]
    return nodes, links, groups


SEGMENTATION_NOTE = """The mask here comes from a file (Load Image (as Mask), white = subject). To segment your pictures \
in the graph instead, put a segmentation node between Load Image and MoA Subject's 'mask', e.g. from:
- comfyui_segment_anything (GroundingDINO + SAM: a text prompt such as 'person' gives the mask),
- ComfyUI-segment-anything-2 (SAM 2, points or boxes),
- ComfyUI-Impact-Pack (SAM Detector, detector-driven masks),
- ComfyUI-RMBG (background removal: the foreground as the mask).
Or paint the subject in the Mask Editor (right-click the picture) and connect Load Image's MASK output."""


def build_dataset():
    nodes, links = {}, []
    _note(nodes, "Read me: build a training dataset",
          "Each run appends one example (the picture, each subject's mask and reference, the caption) to "
          "ComfyUI/output/<dataset_name>/ in the trainer's manifest format; nothing is overwritten. Load the next "
          "picture and its mask, change the caption, run again. Then check it and train: "
          "`python -m moa_attention.training.dataset output/<dataset_name>` and "
          "`python -m moa_attention.train --data output/<dataset_name> ...` (docs/training.md).",
          "MoA Subject gets this picture and the subject's mask: the mask is saved as the subject's mask and the "
          "picture cropped to it as the reference. The caption must contain every subject's class word. Several "
          "subjects in one picture: chain MoA Subject nodes through 'previous', one mask each.",
          SEGMENTATION_NOTE, height=620)
    nodes["picture"] = dict(type="LoadImage", col=1, title="Picture", widgets={"image": "picture.png"}, size=[320, 340])
    nodes["picture_mask"] = dict(type="LoadImageMask", col=1, title="Subject mask (white = subject)",
                                 widgets={"image": "picture_mask.png", "channel": "red"}, size=[320, 340])
    nodes["subject"] = dict(type="MoASubject", col=2, title="MoA Subject (woman)", widgets={"class_word": "woman"})
    nodes["save"] = dict(type="MoASaveTrainingExample", col=2, size=[400, 260], widgets={
        "caption": "a photo of a woman in a space suit holding a helmet", "dataset_name": "moa_dataset"})
    links += [("picture", 0, "subject", "image"), ("picture_mask", 0, "subject", "mask"),
              ("subject", 0, "save", "subjects"), ("picture", 0, "save", "image")]
    groups = [("Picture and mask", ["picture", "picture_mask"]), ("Example", ["subject", "save"])]
    return nodes, links, groups


WORKFLOWS = {"moa_single_subject": single_subject, "moa_two_subjects": two_subjects,
             "moa_compare_strength": compare_strength, "moa_subject_swap": subject_swap, "moa_morph": morph,
             "moa_two_subjects_regions": regions, "moa_controlnet_pose": controlnet_pose,
             "moa_style_lora": style_lora, "moa_build_dataset": build_dataset,
             "moa_sdxl_single_subject": lambda: single_subject(SDXL),
             "moa_sdxl_two_subjects_regions": lambda: regions(SDXL)}

BUILD_JS = r"""
const [spec, done] = [arguments[0], arguments[arguments.length - 1]];
(async () => {
  await app.loadGraphData({nodes: [], links: [], groups: [], version: 0.4, last_node_id: 0, last_link_id: 0},
                          true, false);
  const made = {};
  for (const [key, s] of spec.nodes) {
    const n = LiteGraph.createNode(s.type);
    if (!n) throw new Error('unknown node type ' + s.type);
    if (s.title) n.title = s.title;
    app.graph.add(n);
    for (const [name, value] of Object.entries(s.widgets || {})) {
      const w = (n.widgets || []).find(w => w.name === name);
      if (!w) throw new Error(`${s.type} has no widget ${name}`);
      w.value = value;
    }
    if (s.size) n.setSize(s.size);
    made[key] = n;
  }
  for (const [src, out, dst, input] of spec.links) {
    const slot = made[dst].findInputSlot(input);
    if (slot < 0) throw new Error(`${dst} has no input ${input}`);
    if (!made[src].connect(out, made[dst], slot)) throw new Error(`cannot connect ${src}:${out} -> ${dst}.${input}`);
  }
  // columns, top to bottom; x from the widest node of the previous column
  const TH = LiteGraph.NODE_TITLE_HEIGHT, GAP = 40, GROUP_HEAD = 50;
  const cols = {};
  for (const [key, s] of spec.nodes) (cols[s.col] = cols[s.col] || []).push(key);
  let x = 0;
  for (const c of Object.keys(cols).map(Number).sort((a, b) => a - b)) {
    let y = GROUP_HEAD + TH, width = 0;
    for (const key of cols[c]) {
      const n = made[key];
      n.pos = [x, y];
      y += n.size[1] + TH + GAP + (spec.groupStarts.includes(key) ? GROUP_HEAD : 0);
      width = Math.max(width, n.size[0]);
    }
    x += width + 2 * GAP;
  }
  for (const [title, keys] of spec.groups) {
    const g = new LiteGraph.LGraphGroup(title);
    const ns = keys.map(k => made[k]);
    const x0 = Math.min(...ns.map(n => n.pos[0])) - 15, y0 = Math.min(...ns.map(n => n.pos[1] - TH)) - GROUP_HEAD + 5;
    const x1 = Math.max(...ns.map(n => n.pos[0] + n.size[0])) + 15, y1 = Math.max(...ns.map(n => n.pos[1] + n.size[1])) + 15;
    g.pos = [x0, y0];
    g.size = [x1 - x0, y1 - y0];
    app.graph.add(g);
  }
  app.canvas.ds.scale = 0.7;            // the view the workflow opens with: most of it on one screen
  app.canvas.ds.offset = [110, 150];  // clear of the sidebar and the top bars
  app.graph.setDirtyCanvas(true, true);
  done(JSON.stringify(app.graph.serialize(), null, 2));
})().catch(e => done('ERROR: ' + e.stack));
"""


def build(driver, name: str) -> str:
    nodes, links, groups = WORKFLOWS[name]()
    order = list(nodes.items())
    # a node that opens a group (not the first in its column) gets room above it for the group's title
    starts = []
    for _, keys in groups:
        first = keys[0]
        col = nodes[first]["col"]
        if [k for k, s in order if s["col"] == col][0] != first:
            prev = [k for k, s in order if s["col"] == col]
            starts.append(prev[prev.index(first) - 1])
    spec = {"nodes": [[k, {kk: vv for kk, vv in s.items() if vv is not None}] for k, s in order],
            "links": links, "groups": groups, "groupStarts": starts}
    out = driver.execute_async_script(BUILD_JS, spec)
    if out.startswith("ERROR"):
        raise RuntimeError(f"{name}: {out}")
    return out


def finish(name: str, text: str) -> str:
    """A stable workflow id per file (the editor makes a random one), so regenerating changes only what changed."""
    wf = json.loads(text)
    wf["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-moa/workflows/{name}"))
    return json.dumps(wf, indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8188")
    ap.add_argument("--out", default=str(ROOT / "workflows"))
    ap.add_argument("--screenshot", help="save a screenshot of the last workflow here")
    ap.add_argument("names", nargs="*", default=list(WORKFLOWS))
    a = ap.parse_args()
    driver = start_chromium()
    try:
        open_editor(driver, a.url)
        for name in a.names:
            text = finish(name, build(driver, name))
            path = Path(a.out) / f"{name}.json"
            path.write_text(text)
            print(f"wrote {path}")
        if a.screenshot:
            driver.save_screenshot(a.screenshot)
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
