"""Offline evaluation of generated pictures: `python -m moa_attention.evaluate FOLDER` walks a folder
with a sidecar manifest and writes a CSV and a JSON table (how to read them: docs/evaluation.md).
It may import comfyui/, engine/, scoring/ and faces/; nodes never import it (MoA Evaluate uses
scoring/ directly)."""
