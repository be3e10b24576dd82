"""The trainer on the tiny SD1.5 checkpoint and a tiny synthetic dataset."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support.datasets import write_dataset
from support.trainer_cli import check_resume_reproduces, log_rows, run_in_process, train_args
from support.waits import minutes, wait_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_env(models_base, tmp_path_factory):
    base, info = models_base
    data = write_dataset(tmp_path_factory.mktemp("data"), n=2)
    # the encoded-dataset cache: per test session, shared by the runs below (subprocesses inherit it)
    os.environ["MOA_CACHE_DIR"] = str(tmp_path_factory.mktemp("encoded_cache"))
    return {"base": base, "ckpt": info["checkpoint_path"], "clip_vision": info["clip_vision_path"], "data": data}


SAMPLED: list[dict] = []      # what the UNet and the adapter looked like right after each sample


def _placement(module: torch.nn.Module) -> set:
    return {(p.device.type, p.dtype) for p in module.parameters()}


@pytest.fixture(scope="module")
def trained(train_env, tmp_path_factory, comfy):
    """12 steps with a sample through ComfyUI's sampler in the middle (step 6) and at the end: the
    sampler unloads the base model (to the offload device) and the loop must go on training."""
    import comfyui_moa.moa_attention.training.loop as loop
    real = loop.write_sample

    def recording(cfg, model, vae, loaded, example, step, device):
        unet, adapter = model.model.diffusion_model, loaded.adapter
        before = {"unet": _placement(unet), "adapter": _placement(adapter)}
        path = real(cfg, model, vae, loaded, example, step, device)
        SAMPLED.append({"step": step, "before": before, "unet": _placement(unet), "adapter": _placement(adapter),
                        "adapter_trainable": all(p.requires_grad for p in adapter.parameters()),
                        "unet_frozen": not any(p.requires_grad for p in unet.parameters())})
        return path

    out = tmp_path_factory.mktemp("run") / "moa_run"
    loop.write_sample = recording
    try:
        assert run_in_process(train_args(train_env, out, "--steps", "12", "--checkpoint-every", "6",
                                         "--sample-every", "6", "--sample-steps", "2")) == 0
    finally:
        loop.write_sample = real
    return out


def test_training_lowers_the_loss_and_logs_the_disentanglement_numbers(trained):
    # whether the adapter disentangles is judged on a world where that can be learnt
    # (tests/test_toy_world.py): a random base model's eps carries no subject to route
    summary = json.loads((trained / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["loss"] < before["loss"], summary
    for key in ("share_auroc", "fg_share", "bg_share", "change_in", "change_out"):
        assert key in after and after[key] == after[key], (key, summary)       # present, not NaN
    assert before["change_in"] == before["change_out"] == 0.0, before          # a fresh adapter is the base model
    rows = log_rows(trained)
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert all(r["share_auroc"] != "" for r in rows)
    assert (trained / "samples" / "step_000012.png").is_file()
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["step_000006", "step_000012"]


def test_the_adapter_records_the_image_encoder_of_its_clip_vision(trained):
    """Read from the loaded --clip-vision (tests/test_bases.py trains with another width)."""
    from comfyui_moa.moa_attention.engine.adapter_file import read_adapter_metadata
    for path in (trained / "adapter.safetensors", trained / "checkpoints" / "step_000006" / "adapter.safetensors"):
        meta = read_adapter_metadata(path)
        assert (meta["moa.image_encoder"], meta["moa.image_dim"], meta["moa.base"]) == ("clip_vit_l14", "768", "sd15")


def test_a_sample_mid_run_leaves_the_models_where_training_runs(trained):
    assert [s["step"] for s in SAMPLED] == [6, 12]
    assert (trained / "samples" / "step_000006.png").is_file()
    for s in SAMPLED:
        assert s["unet"] == s["before"]["unet"] and s["adapter"] == s["before"]["adapter"] == {("cpu", torch.float32)}, s
        assert s["adapter_trainable"] and s["unet_frozen"], s
    rows = log_rows(trained)
    after_sample = [float(r["loss"]) for r in rows if int(r["step"]) > 6]
    assert len(after_sample) == 6 and all(v == v and v < 1e3 for v in after_sample), rows


def test_step_casts_inputs_to_a_half_precision_unet(comfy):
    """ComfyUI loads SD1.5 in fp16 on CUDA: the step must feed the UNet its own dtype (as
    BaseModel._apply_model does) and still compute the losses in fp32. bf16 stands in for fp16
    on the CPU."""
    from support.model_factory import build_sd15_model_patcher, tiny_unet_config
    from comfyui_moa.moa_attention.comfyui.sampling import alphas_cumprod
    from comfyui_moa.moa_attention.engine.adapter import init_adapter_from_unet
    from comfyui_moa.moa_attention.engine.layer import install_layers
    from comfyui_moa.moa_attention.training.config import TrainConfig
    from comfyui_moa.moa_attention.training.encode import Example
    from comfyui_moa.moa_attention.training.step import MoATrainStep, draw
    model = build_sd15_model_patcher(tiny_unet_config(model_channels=32, levels=1), seed=0, dtype=torch.bfloat16)
    unet = model.model.diffusion_model.requires_grad_(False)
    assert next(unet.parameters()).dtype == torch.bfloat16
    adapter = init_adapter_from_unet(unet, rank=4, router_margin=1.0)
    install_layers(unet, adapter)
    masks = torch.zeros(1, 8, 8)
    masks[:, 2:6, 2:6] = 1
    examples = [Example(torch.randn(4, 8, 8), torch.randn(77, 768), [[2]], [torch.randn(768)], masks, "a dog")
                for _ in range(2)]
    cfg = TrainConfig(Path(), Path(), Path(), Path(), batch_size=2, background_effect_weight=1.0)
    step = MoATrainStep(adapter, unet, alphas_cumprod(model.model), cfg)
    idx, noise, t = draw(0, 0, cfg, len(examples), (4, 8, 8), "cpu")
    assert noise.dtype == torch.float32
    losses = step([examples[i] for i in idx], noise, t)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in losses.values()), losses
    losses["loss"].backward()
    grads = [p.grad for p in adapter.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)
    assert all(p.grad is None for p in unet.parameters())


def test_identity_tokens_train_with_examples_of_different_subject_counts(comfy, monkeypatch):
    """identity_tokens=2: an example with two subjects has one more token than an example with
    one; the step pads the shorter prompt, the object loss sees each subject's further token, and
    the fusion's further-token weights get a gradient."""
    from support.model_factory import build_sd15_model_patcher, tiny_unet_config
    from comfyui_moa.moa_attention.comfyui.sampling import alphas_cumprod
    from comfyui_moa.moa_attention.engine.adapter import init_adapter_from_unet
    from comfyui_moa.moa_attention.engine.layer import install_layers
    from comfyui_moa.moa_attention.training.config import TrainConfig
    from comfyui_moa.moa_attention.training.encode import Example
    from comfyui_moa.moa_attention.training.step import MoATrainStep
    model = build_sd15_model_patcher(tiny_unet_config(model_channels=32, levels=1), seed=0)
    unet = model.model.diffusion_model.requires_grad_(False)
    adapter = init_adapter_from_unet(unet, rank=4, router_margin=1.0, identity_tokens=2)
    install_layers(unet, adapter)
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 8, 8)
    masks[0, 1:4, 1:4] = masks[1, 5:8, 5:8] = 1
    two = Example(torch.randn(4, 8, 8, generator=g), torch.randn(77, 768, generator=g), [[2], [5]],
                  [torch.randn(768, generator=g), torch.randn(768, generator=g)], masks, "a dog and a cat")
    one = Example(torch.randn(4, 8, 8, generator=g), torch.randn(77, 768, generator=g), [[2]],
                  [torch.randn(768, generator=g)], masks[:1], "a dog")
    from comfyui_moa.moa_attention.training import step as step_mod
    seen, capture = [], step_mod.LossCapture
    monkeypatch.setattr(step_mod, "LossCapture", lambda tokens: seen.append(tokens) or capture(tokens))
    step = MoATrainStep(adapter, unet, alphas_cumprod(model.model), TrainConfig(Path(), Path(), Path(), Path()))
    f = step.run([two, one], torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700, 300]), with_base=False)
    assert seen == [[[[2, 77], [5, 78]], [[2, 77]]]], "the object loss must see each subject's further token"
    maps = next(c.maps for c in f.captured if c.maps is not None)
    assert [len(m) for m in maps] == [2, 1]
    losses = step([two, one], torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700, 300]))
    losses["object"].backward()
    further = adapter.fusion.fc2.weight.grad.view(2, 768, -1)[1]
    assert torch.isfinite(losses["loss"]) and further.abs().sum() > 0, "the further token gets no gradient"


def _grad_norm(adapter, routers: bool) -> float:
    """Gradient norm of the routers' parameters, or of everything else (experts, fusion)."""
    return float(sum(p.grad.norm() ** 2 for n, p in adapter.named_parameters()
                     if p.grad is not None and ("router" in n) == routers) ** 0.5)


def test_mask_routed_loss_trains_the_expert_at_full_share_from_a_fresh_router(comfy):
    """A fresh router gives the expert a share of 0.018, so the subject's denoising error reaches
    the expert scaled by it; routed by the subject mask, the same error reaches it in full, and
    the router (saturated) is left to its own losses."""
    from support.model_factory import build_sd15_model_patcher, tiny_unet_config
    from comfyui_moa.moa_attention.comfyui.sampling import alphas_cumprod
    from comfyui_moa.moa_attention.engine.adapter import init_adapter_from_unet
    from comfyui_moa.moa_attention.engine.layer import install_layers
    from comfyui_moa.moa_attention.training.config import TrainConfig
    from comfyui_moa.moa_attention.training.encode import Example
    from comfyui_moa.moa_attention.training.losses import mask_routed_loss
    from comfyui_moa.moa_attention.training.step import MoATrainStep
    model = build_sd15_model_patcher(tiny_unet_config(model_channels=32, levels=1), seed=0)
    unet = model.model.diffusion_model.requires_grad_(False)
    adapter = init_adapter_from_unet(unet, rank=4)
    install_layers(unet, adapter)
    masks = torch.zeros(1, 8, 8)
    masks[:, 2:6, 2:6] = 1
    g = torch.Generator().manual_seed(0)
    batch = [Example(torch.randn(4, 8, 8, generator=g), torch.randn(77, 768, generator=g), [[2]],
                     [torch.randn(768, generator=g)], masks, "a dog")]
    step = MoATrainStep(adapter, unet, alphas_cumprod(model.model), TrainConfig(Path(), Path(), Path(), Path()))
    noise, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([700])
    abar = step.alphas_cumprod[t]
    with torch.no_grad():
        for routed in (False, True):
            # a fresh expert is the prior: routed by the mask or by the router, the base's prediction
            f = step.run(batch, noise, t, with_base=True, mask_routed=routed)
            torch.testing.assert_close(f.pred, f.base, atol=1e-5, rtol=1e-5)
        for name, p in adapter.named_parameters():
            if "expert" in name:
                p.add_(1e-2 * torch.randn(p.shape, generator=g))     # an expert that differs from the prior
    grads = {}
    for routed in (False, True):
        adapter.zero_grad(set_to_none=True)
        f = step.run(batch, noise, t, with_base=False, mask_routed=routed)
        mask_routed_loss(f.pred, f.noise, f.masks, abar, cap=20.0).backward()
        grads[routed] = (_grad_norm(adapter, routers=False), _grad_norm(adapter, routers=True))
    assert grads[True][0] > 20 * grads[False][0], grads      # ~1 / 0.018 = 55x
    assert grads[False][1] > 0 and grads[True][1] == 0, grads


def test_recolour_gives_each_subject_the_next_examples_colours_and_leaves_the_rest():
    from comfyui_moa.moa_attention.training.recolour import recolour_subjects
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, 4, 1, 1)
    masks = torch.zeros(3, 2, 8, 8)
    masks[:, 0, 1:4, 1:4] = 1.0
    masks[:, 1, 5:8, 4:8] = 1.0
    out = recolour_subjects(x0, masks)
    inside = masks.amax(dim=1) > 0
    torch.testing.assert_close(out[:, :, ~inside[0]], x0[:, :, ~inside[0]], rtol=0, atol=0)   # bit for bit
    for i, j in ((0, 2), (1, 0), (2, 1)):                       # example i shows example j's colours
        got, src = out[i][:, inside[i]], x0[j][:, inside[j]]
        torch.testing.assert_close(got.mean(dim=1), src.mean(dim=1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.std(dim=1), src.std(dim=1), rtol=1e-4, atol=1e-5)
        # the subject's own pattern stays: per channel a positive affine map of its pixels
        corr = torch.corrcoef(torch.stack([got[0], x0[i][0, inside[i]]]))[0, 1]
        assert corr > 0.999
    torch.testing.assert_close(recolour_subjects(x0[:1], masks[:1]), x0[:1], rtol=0, atol=0)


def test_recolour_changes_the_input_from_recolour_t_on_and_the_target_leads_back_to_the_true_picture(comfy):
    from support.model_factory import build_sd15_model_patcher, tiny_unet_config
    from comfyui_moa.moa_attention.comfyui.sampling import alphas_cumprod
    from comfyui_moa.moa_attention.engine.adapter import init_adapter_from_unet
    from comfyui_moa.moa_attention.engine.layer import install_layers
    from comfyui_moa.moa_attention.training.config import TrainConfig
    from comfyui_moa.moa_attention.training.encode import Example
    from comfyui_moa.moa_attention.training.recolour import recolour_subjects
    from comfyui_moa.moa_attention.training.step import MoATrainStep
    model = build_sd15_model_patcher(tiny_unet_config(model_channels=32, levels=1), seed=0)
    unet = model.model.diffusion_model.requires_grad_(False)
    adapter = init_adapter_from_unet(unet, rank=4)
    install_layers(unet, adapter)
    g = torch.Generator().manual_seed(0)
    batch = []
    for k in range(2):
        masks = torch.zeros(1, 8, 8)
        masks[:, 2 + k:6, 2:6] = 1
        batch.append(Example(torch.randn(4, 8, 8, generator=g) + 3 * k, torch.randn(77, 768, generator=g),
                             [[2]], [torch.randn(768, generator=g)], masks, "a dog"))
    cfg = TrainConfig(Path(), Path(), Path(), Path(), recolour_t=500)
    step = MoATrainStep(adapter, unet, alphas_cumprod(model.model), cfg)
    noise, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700])
    with torch.no_grad():
        plain = step.run(batch, noise, t, with_base=True)
        recoloured = step.run(batch, noise, t, with_base=True, recolour=True)
    # below recolour_t nothing changes; from it on the input shows the other subject's colours ...
    torch.testing.assert_close(recoloured.pred[0], plain.pred[0], rtol=0, atol=0)
    torch.testing.assert_close(recoloured.noise[0], noise[0], rtol=0, atol=0)
    assert (recoloured.base[1] - plain.base[1]).abs().mean() > 0.01
    # ... and the target is the epsilon of the *true* picture: x_t - sqrt(1 - abar) target = sqrt(abar) x0
    abar = step.alphas_cumprod[700]
    x0 = torch.stack([e.latent for e in batch])
    x_t = abar.sqrt() * recolour_subjects(x0, recoloured.masks)[1] + (1 - abar).sqrt() * noise[1]
    torch.testing.assert_close((x_t - (1 - abar).sqrt() * recoloured.noise[1]) / abar.sqrt(), x0[1],
                               rtol=1e-4, atol=1e-4)
    assert (recoloured.noise[1] - noise[1]).abs().amax() > 0.5


@pytest.mark.parametrize("bias", ["uniform", "cubic"])
def test_data_parallel_ranks_draw_slices_of_the_one_process_batch(bias):
    from comfyui_moa.moa_attention.training.config import TrainConfig
    from comfyui_moa.moa_attention.training.step import draw
    one = TrainConfig(Path(), Path(), Path(), Path(), batch_size=6, seed=5, timestep_bias=bias)
    three = TrainConfig(Path(), Path(), Path(), Path(), batch_size=2, seed=5, timestep_bias=bias)
    for step in (0, 7):
        idx, noise, t = draw(step, 0, one, 50, (4, 8, 8), "cpu")
        parts = [draw(step, r, three, 50, (4, 8, 8), "cpu", world=3) for r in range(3)]
        assert sum((p[0] for p in parts), []) == idx
        assert torch.equal(torch.cat([p[1] for p in parts]), noise)
        assert torch.equal(torch.cat([p[2] for p in parts]), t)


#: the trainer's off-by-default research knobs, listed apart in --help
RESEARCH_OPTIONS = ("--router-loss-power", "--router-margin", "--subject-x0-weight", "--effect-x0-weight",
                    "--x0-weight-cap", "--timestep-bias", "--mask-routed-weight", "--recolour-t", "--identity-tokens")


def test_help_lists_the_research_knobs_apart_under_experimental(capsys):
    from comfyui_moa.moa_attention.training.cli import build_parser, parse_args
    from comfyui_moa.moa_attention.training.config import TrainConfig
    main, found, experimental = build_parser().format_help().partition("\nexperimental:\n")
    assert found, "no 'experimental' section in --help"
    options = re.split(r"\n(?:options|optional arguments):\n", main)[1]
    for flag in RESEARCH_OPTIONS:
        assert f"  {flag} " in experimental and f"  {flag} " not in options, flag
    for flag in ("--lr", "--steps", "--subject-loss-weight", "--router-loss-weight", "--subject-route-weight",
                 "--background-effect-weight", "--object-loss-weight"):
        assert f"  {flag} " in options and f"  {flag} " not in experimental, flag
    # grouped, not changed: the same names and the same defaults
    cfg = parse_args(["--base", "b", "--clip-vision", "c", "--data", "d", "--output-dir", "o"])
    assert cfg == TrainConfig(Path("b"), Path("c"), Path("d"), Path("o"))
    assert parse_args(["--base", "b", "--clip-vision", "c", "--data", "d", "--output-dir", "o",
                       "--timestep-bias", "cubic", "--router-margin", "4"]).router_margin == 4.0
    with pytest.raises(SystemExit):
        parse_args(["--base", "b", "--clip-vision", "c", "--data", "d", "--output-dir", "o", "--identity-tokens", "0"])
    assert "--identity-tokens a number >= 1" in capsys.readouterr().err


def test_trainer_state_comes_back_exactly_also_from_files_with_the_old_extra_entry(tmp_path):
    """AdamW's moments and step counts come back exactly; files of older versions, whose header
    also holds an "extra" entry, still load."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from comfyui_moa.moa_attention.training.checkpoints import load_trainer_state, save_trainer_state

    def optimizer():
        params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
        return params, torch.optim.AdamW(params, lr=1e-2)
    params, trained_opt = optimizer()
    for _ in range(3):
        trained_opt.zero_grad()
        (2 * params[0].sum() + (params[1] ** 3).sum()).backward()
        trained_opt.step()
    names = {0: "a", 1: "b"}
    path = tmp_path / "state.safetensors"
    save_trainer_state(path, trained_opt, names, step=3)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert "extra" not in meta
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**meta, "extra": json.dumps({"note": 1})})
    want = trained_opt.state_dict()["state"]
    for file in (path, old):
        _, fresh = optimizer()
        assert load_trainer_state(file, fresh, names) == 3
        got = fresh.state_dict()["state"]
        for i in (0, 1):
            assert torch.equal(got[i]["exp_avg"], want[i]["exp_avg"]) and float(got[i]["step"]) == 3
            assert torch.equal(got[i]["exp_avg_sq"], want[i]["exp_avg_sq"])


def test_trained_adapter_loads_in_the_node_and_samples_through_the_server(trained, server, server_inputs):
    from support.graphs import moa_graph
    target = server.base / "models" / "moa" / "trained_tiny.safetensors"
    shutil.copy(trained / "adapter.safetensors", target)
    info = server.request("/object_info/MoAAdapterLoader")
    assert "trained_tiny.safetensors" in info["MoAAdapterLoader"]["input"]["required"]["adapter_name"][0]
    g = moa_graph("trained_tiny.safetensors", [{"image": "cat.png", "mask": "cat_mask.png", "word": "dog"}],
                  "a photo of a dog on the grass")
    entry = server.run(g)
    assert entry["status"]["status_str"] == "success", entry["status"]


def test_resume_continues_the_same_run(train_env, trained, tmp_path):
    check_resume_reproduces(train_env, trained, tmp_path / "resumed", steps=12, every=6)


def test_output_is_not_overwritten_without_force(train_env, trained, capsys):
    from comfyui_moa.moa_attention.engine.errors import MoAInputError
    from comfyui_moa.moa_attention.training.cli import main
    before = (trained / "adapter.safetensors").read_bytes()
    with pytest.raises(MoAInputError, match="is not empty: pass --resume .* or --force"):
        run_in_process(train_args(train_env, trained, "--steps", "1"))
    # the command line says it in one line on stderr and exits 1
    assert main(train_args(train_env, trained, "--steps", "1")) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"{trained} is not empty: pass --resume to continue that run or --force to start over "
                   f"(which deletes its checkpoints, samples and log)")
    assert (trained / "adapter.safetensors").read_bytes() == before


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)


def test_ctrl_c_keeps_the_last_checkpoint(train_env, tmp_path):
    out = tmp_path / "interrupted"
    log = tmp_path / "log.txt"
    proc = _spawn([sys.executable, "-m", "moa_attention.train", *train_args(train_env, out, "--steps", "100000",
                                                                             "--checkpoint-every", "0")], log)
    try:
        def running():
            assert proc.poll() is None, log.read_text()[-3000:]
        wait_for(lambda: (out / "loss_log.csv").exists() and len(log_rows(out)) >= 3, "3 logged training steps",
                 budget_minutes=10, poll=0.5, alive=running)
        proc.send_signal(signal.SIGINT)
        # it finishes the step it is in, writes a checkpoint and exits: minutes on a busy machine
        assert proc.wait(timeout=minutes(10)) == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "interrupted at step" in text and "--resume" in text
    (ckpt,) = list((out / "checkpoints").iterdir())
    step = int(ckpt.name.split("_")[1])
    assert step >= 3 and (ckpt / "adapter.safetensors").is_file()


def test_router_loss_gradient_pushes_background_to_the_prior():
    from comfyui_moa.moa_attention.engine.router import Router
    from comfyui_moa.moa_attention.training.capture import Captured
    from comfyui_moa.moa_attention.training.losses import router_loss
    torch.manual_seed(0)
    router = Router(8)
    router.reset_fresh()
    x = torch.randn(1, 16, 8)
    masks = torch.zeros(1, 1, 4, 4)
    masks[..., :2, :] = 1.0
    loss = router_loss([Captured("layer", "attn1", router(x), None)], masks, (4, 4))
    loss.backward()
    # raising the personal logit's bias would raise the background share: its gradient is positive
    assert router.fc2.bias.grad[1] > 0 and router.fc2.bias.grad[0] < 0


def test_cubic_timestep_bias_draws_mostly_high_noise_steps():
    from comfyui_moa.moa_attention.training.config import TrainConfig
    from comfyui_moa.moa_attention.training.step import draw
    share = {}
    for bias in ("uniform", "cubic"):
        cfg = TrainConfig(Path(), Path(), Path(), Path(), batch_size=500, seed=1, timestep_bias=bias)
        t = torch.cat([draw(step, 0, cfg, 10, (1, 1, 1), "cpu")[2] for step in range(8)])
        assert 0 <= int(t.min()) and int(t.max()) <= 999
        share[bias] = float((t >= 750).float().mean())
    # t = 1000 (1 - u^3) >= 750  <=>  u <= 0.25^(1/3): 63% of the steps instead of 25%
    assert share["uniform"] == pytest.approx(0.25, abs=0.03)
    assert share["cubic"] == pytest.approx(0.25 ** (1 / 3), abs=0.03)


def test_cosine_lr_schedule_decays_from_lr_to_zero_over_the_run(train_env, tmp_path):
    """Each step's rate is a function of the step: a resumed run is on the interrupted run's
    schedule without any scheduler state in the checkpoint. The log shows the rate each step used."""
    from comfyui_moa.moa_attention.training.config import TrainConfig
    from comfyui_moa.moa_attention.training.lr_schedule import learning_rate
    cosine = TrainConfig(Path(), Path(), Path(), Path(), lr=2e-3, steps=4, lr_schedule="cosine")
    expected = [2e-3, 1e-3 * (1 + 0.5 ** 0.5), 1e-3, 1e-3 * (1 - 0.5 ** 0.5)]
    assert [learning_rate(cosine, step) for step in range(4)] == pytest.approx(expected, rel=1e-9)
    assert learning_rate(cosine, 4) == pytest.approx(0.0, abs=1e-12)
    assert {learning_rate(TrainConfig(Path(), Path(), Path(), Path(), lr=2e-3, steps=4), s) for s in range(4)} == {2e-3}
    out = tmp_path / "cosine"
    assert run_in_process(train_args(train_env, out, "--steps", "4", "--lr-schedule", "cosine")) == 0
    assert [float(r["lr"]) for r in log_rows(out)] == pytest.approx(expected, rel=1e-5)


def test_subject_x0_loss_is_the_subjects_x0_error_capped():
    from comfyui_moa.moa_attention.training.losses import subject_x0_loss
    pred = torch.zeros(2, 4, 4, 4)
    target = torch.zeros(2, 4, 4, 4)
    target[:, :, :2] = 1.0                       # eps error 1 on the top half, 0 below
    masks = torch.zeros(2, 1, 4, 4)
    masks[:, :, :1] = 1.0                        # the subject: the top row (error 1)
    masks[1, :, 3] = 1.0                         # example 1 also has the bottom row (error 0)
    abar = torch.tensor([0.5, 0.01])             # (1 - abar) / abar = 1 and 99
    # example 0: mean error 1 x 1; example 1: mean error 0.5 x min(99, cap)
    assert subject_x0_loss(pred, target, masks, abar, cap=20.0).item() == pytest.approx((1.0 + 10.0) / 2)
    assert subject_x0_loss(pred, target, masks, abar, cap=200.0).item() == pytest.approx((1.0 + 49.5) / 2)
    target[:, :, 2] = 7.0                        # an error outside every subject does not count
    assert subject_x0_loss(pred, target, masks, abar, cap=20.0).item() == pytest.approx((1.0 + 10.0) / 2)


def test_background_effect_x0_loss_scales_the_outside_change_per_example():
    from comfyui_moa.moa_attention.training.losses import background_effect_loss, background_effect_x0_loss
    g = torch.Generator().manual_seed(0)
    pred, base = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    masks = torch.zeros(2, 1, 4, 4)
    masks[:, :, :2] = 1.0
    abar = torch.tensor([0.5, 0.01])
    per_example = [background_effect_loss(pred[i:i + 1], base[i:i + 1], masks[i:i + 1]).item() for i in range(2)]
    expected = (per_example[0] * 1.0 + per_example[1] * 20.0) / 2
    assert background_effect_x0_loss(pred, base, masks, abar, cap=20.0).item() == pytest.approx(expected, rel=1e-5)
    base[:, :, :2] += 9.0                        # a change inside the subject does not count
    assert background_effect_x0_loss(pred, base, masks, abar, cap=20.0).item() == pytest.approx(expected, rel=1e-5)


def test_a_comfyui_folder_that_is_not_comfyui_is_refused(tmp_path):
    """--comfyui pointing elsewhere is an error naming the folder, not a silent fallback."""
    from support.runtime import COMFY_DIR
    from comfyui_moa.moa_attention.comfyui.bootstrap import ComfyUINotFoundError, find_comfyui
    with pytest.raises(ComfyUINotFoundError, match=f"{tmp_path} is not a ComfyUI folder .* main.py"):
        find_comfyui(tmp_path)
    assert find_comfyui(COMFY_DIR) == COMFY_DIR
