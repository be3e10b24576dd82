"""Score generated pictures: `python -m moa_attention.evaluate FOLDER [--face-model buffalo_l]
[--clip-vision FILE] [--text-encoder FILE]`. FOLDER holds manifest.jsonl (see manifest.py); writes
FOLDER/evaluation.csv and FOLDER/evaluation.json and prints the table. Context preservation and
router shares need nothing but the files; identity needs --face-model (people, ArcFace) or
--clip-vision (any subject); the prompt score needs --text-encoder and --clip-vision (ComfyUI is
imported only for those two)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..engine.errors import MoAError, MoAInputError
from ..scoring.evaluator import Evaluator
from .manifest import MANIFEST
from .run import evaluate_folder, summary_text, write_csv, write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moa_attention.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="folder with manifest.jsonl and the pictures")
    p.add_argument("--manifest", default=MANIFEST, help="manifest file name inside the folder (default %(default)s)")
    p.add_argument("--out", type=Path, default=None,
                   help="output path without extension (default FOLDER/evaluation -> .csv and .json)")
    p.add_argument("--face-model", default=None,
                   help="insightface model folder name for the ArcFace identity, e.g. buffalo_l or antelopev2")
    p.add_argument("--insightface", type=Path, default=None,
                   help="insightface root holding models/<face-model>/*.onnx (default: ComfyUI's models/insightface)")
    p.add_argument("--provider", default="CPU", help="onnxruntime provider for the face models: CPU, CUDA, ...")
    p.add_argument("--clip-vision", type=Path, default=None, help="CLIP ViT-L/14 vision model (.safetensors)")
    p.add_argument("--text-encoder", type=Path, default=None,
                   help="CLIP-L text encoder WITH text_projection (e.g. OpenAI's clip-vit-large-patch14 "
                        "model.safetensors) for the prompt score")
    p.add_argument("--comfyui", type=Path, default=None,
                   help="ComfyUI folder, for --clip-vision/--text-encoder (default: $COMFYUI_PATH, the ComfyUI "
                        "this pack is installed in, or the dev checkout's .dev/ComfyUI)")
    return p


def build_evaluator(args) -> Evaluator:
    ev = Evaluator()
    if args.face_model:
        from ..faces import identity
        root = args.insightface
        if root is None:
            from ..comfyui.bootstrap import find_comfyui
            root = find_comfyui(args.comfyui) / "models" / "insightface"
        ev.face_embedding = identity.face_embedder_for(root, args.face_model, args.provider)
    if args.text_encoder and not args.clip_vision:
        raise MoAInputError("--text-encoder needs --clip-vision too (the CLIP ViT-L/14 vision model it pairs with)")
    if args.clip_vision:
        from ..comfyui.bootstrap import start_comfyui
        start_comfyui(args.comfyui)
        from ..comfyui import clip_scores
        from ..comfyui.loading import load_clip_vision
        if args.text_encoder:
            clip_scores.check_text_projection(args.text_encoder)    # refuse before loading anything
        clip_vision = load_clip_vision(args.clip_vision, "--clip-vision")
        ev.subject_embedding = clip_scores.subject_embedder(clip_vision)
        if args.text_encoder:
            ev.prompt_score = clip_scores.prompt_scorer(clip_scores.load_text_encoder(args.text_encoder), clip_vision)
    return ev


def main(argv: list[str] | None = None) -> int:
    """0: every row got all its numbers; 1: some rows have errors (the files are still written);
    2: nothing could be evaluated (no manifest, a model that does not load)."""
    args = build_parser().parse_args(argv)
    if not args.folder.is_dir():
        print(f"error: {args.folder} is not a folder", file=sys.stderr)
        return 2
    try:
        evaluator = build_evaluator(args)
        rows = evaluate_folder(args.folder, evaluator, args.manifest)
    except (MoAError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or args.folder / "evaluation"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {"folder": str(args.folder), "manifest": args.manifest, "face_model": args.face_model,
              "clip_vision": str(args.clip_vision) if args.clip_vision else None,
              "text_encoder": str(args.text_encoder) if args.text_encoder else None}
    csv_path = write_csv(rows, Path(f"{out}.csv"))
    json_path = write_json(rows, Path(f"{out}.json"), config)
    print(summary_text(rows))
    print(f"\nwrote {csv_path} and {json_path}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1
