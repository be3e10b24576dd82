"""comfyui-moa's implementation, in four layers (imports point down this list, never up):

- comfyui/  the only code that knows ComfyUI: the ModelPatcher patch, which batch rows are
            personalized, prompt and subject encoding with ComfyUI's CLIP objects, the
            loaded-adapter bookkeeping and the model checks;
- engine/   pure torch: the MoA attention layer, router, experts, fusion MLP, per-call state
            and its observers, the adapter module and file format. Never imports ComfyUI;
- training/ the offline trainer (`python -m moa_attention.train`); nothing else imports it;
- scoring/  pure torch: the evaluation numbers (metrics, one picture's scores, the report and
            comparison grid), shared by MoA Evaluate, the evaluation command line and the trainer;
            never imports ComfyUI;
- faces/    optional insightface face alignment and ArcFace identity for human subjects, and
            their errors;
- evaluation/ the evaluation command line (`python -m moa_attention.evaluate FOLDER`); nothing
            imports it (MoA Evaluate uses scoring/ directly).

The node classes live in the pack's nodes/ folder, not here.
"""
__version__ = "0.1.0"
