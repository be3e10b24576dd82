"""The ComfyUI layer: the only code that knows ModelPatcher, conds, batching and ComfyUI's
CLIP objects. patch.py installs MoA on a clone, batch.py decides per UNet call which rows are
personalized, prompt.py and subjects.py build the multimodal prompt (for the nodes and the
trainer alike), adapters.py keeps ComfyUI's bookkeeping of loaded adapters, models.py says
which models MoA accepts. For the code that runs outside a graph (trainer, evaluation,
experiments): bootstrap.py starts ComfyUI in-process, loading.py loads model files,
sampling.py holds the noise schedule, latent encoding and the sampler call."""
