"""The MoA engine in pure torch: what MoA computes, independent of any runtime.

router.py (per-pixel share), experts.py (the personalized projections), layer.py (prior +
expert mixed by the router), call_state.py (what the layers of one UNet call share, and the
observer events they emit), masks.py (masks and shares between the picture's, the latent's and
a layer's grids), router_maps.py (an observer that averages shares), fusion.py and
prompt_tokens.py (the multimodal prompt), subject_images.py (reference crops), adapter.py and
adapter_file.py (the adapter module and its .safetensors format), files.py (atomic writes and the
JSON-lines manifests), finite.py (NaN/inf refused where inputs enter), errors.py.
"""
