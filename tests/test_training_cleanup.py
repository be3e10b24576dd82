"""train_adapter borrows the caller's UNet and gives it back as it came, however training ends:
the last step, Ctrl-C, a NaN loss, an exception inside a step. "As it came": the same attention
module objects (no MoA layer left behind), the transformer blocks' own forward (no gradient
checkpointing wrapper), the same requires_grad flags, train/eval modes and weights. Failures
reach the caller as exceptions it can catch, never as SystemExit."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch


def _examples(n: int, latent_value: float | None = None, text_width: int = 768) -> list:
    from comfyui_moa.moa_attention.training.encode import Example
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(1, 8, 8)
    masks[:, 2:6, 2:6] = 1
    out = []
    for _ in range(n):
        latent = torch.randn(4, 8, 8, generator=g)
        if latent_value is not None:
            latent[:, 3, 3] = latent_value
        out.append(Example(latent, torch.randn(77, text_width, generator=g), [[2]], [torch.randn(768, generator=g)],
                           masks, "a dog"))
    return out


def _config(out: Path, **options):
    from comfyui_moa.moa_attention.training.config import TrainConfig
    base = dict(rank=4, batch_size=2, lr=1e-3, steps=3, seed=0, checkpoint_every=1, log_every=1, eval_examples=1,
                device="cpu")
    return TrainConfig(Path(), Path(), Path(), out, **{**base, **options})


def _state(unet: torch.nn.Module) -> dict:
    return {"modules": dict(unet.named_modules()),
            "own_forward": sorted(n for n, m in unet.named_modules() if "forward" in m.__dict__),
            "requires_grad": {n: p.requires_grad for n, p in unet.named_parameters()},
            "training": {n: m.training for n, m in unet.named_modules()},
            "weights": {n: p.detach().clone() for n, p in unet.named_parameters()}}


def _assert_as_it_came(unet: torch.nn.Module, before: dict) -> None:
    after = _state(unet)
    assert after["modules"].keys() == before["modules"].keys()
    changed = [n for n, m in before["modules"].items() if after["modules"][n] is not m]
    assert not changed, f"modules replaced and not restored: {changed[:5]}"
    assert not any(type(m).__name__ == "MoAAttention" for m in unet.modules())
    assert after["own_forward"] == before["own_forward"] == []
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert all(torch.equal(after["weights"][n], w) for n, w in before["weights"].items())


@pytest.fixture
def unet(tiny_model):
    """The tiny SD1.5 UNet as ComfyUI built it: trainable flags on (the trainer turns them off)
    and train mode on one block, so a flag or mode left changed shows."""
    unet = tiny_model.model.diffusion_model
    unet.requires_grad_(True)
    unet.eval()
    unet.out.train()
    return unet


@pytest.fixture
def schedule(tiny_model):
    from comfyui_moa.moa_attention.comfyui.sampling import alphas_cumprod
    return alphas_cumprod(tiny_model.model)


def test_a_finished_run_gives_the_unet_back(unet, schedule, tmp_path):
    from comfyui_moa.moa_attention.training.loop import train_adapter
    before = _state(unet)
    assert train_adapter(_config(tmp_path / "run", steps=2, gradient_checkpointing=True), unet, schedule,
                         _examples(2), "cpu") == 0
    assert (tmp_path / "run" / "adapter.safetensors").is_file()
    _assert_as_it_came(unet, before)


def test_a_nan_loss_raises_a_typed_error_and_gives_the_unet_back(unet, schedule, tmp_path):
    from comfyui_moa.moa_attention.engine.errors import MoAError
    from comfyui_moa.moa_attention.training.loop import NonFiniteLossError, train_adapter
    before = _state(unet)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 1: lower --lr") as caught:
        train_adapter(_config(out), unet, schedule, _examples(2, latent_value=float("nan")), "cpu",
                      eval_examples=_examples(1))
    assert isinstance(caught.value, MoAError) and not isinstance(caught.value, SystemExit)
    _assert_as_it_came(unet, before)
    rows = list(csv.DictReader(open(out / "loss_log.csv")))
    assert [r["step"] for r in rows] == ["1"] and rows[0]["loss"] == "nan"    # logged, then stopped
    assert not any((out / "checkpoints").iterdir())                           # no NaN checkpoint to resume from


def test_an_exception_inside_a_step_reaches_the_caller_and_gives_the_unet_back(unet, schedule, tmp_path):
    """Prompts of the wrong width (an SD2 text encoder's 1024) fail inside the step's UNet call."""
    from comfyui_moa.moa_attention.training.loop import train_adapter
    before = _state(unet)
    with pytest.raises(RuntimeError, match="shape|size") as caught:
        train_adapter(_config(tmp_path / "run", gradient_checkpointing=True), unet, schedule,
                      _examples(2, text_width=1024), "cpu", eval_examples=_examples(1))
    assert "training/step.py" in "".join(str(f.path) for f in caught.traceback)
    _assert_as_it_came(unet, before)


def test_ctrl_c_keeps_a_checkpoint_returns_130_and_gives_the_unet_back(unet, schedule, tmp_path):
    """Ctrl-C while a sample is being drawn (KeyboardInterrupt out of the sampler) after step 2."""
    from comfyui_moa.moa_attention.training.loop import train_adapter

    def interrupted(adapter, step):
        raise KeyboardInterrupt

    before = _state(unet)
    out = tmp_path / "run"
    rc = train_adapter(_config(out, steps=5, checkpoint_every=0, sample_every=2), unet, schedule, _examples(2),
                       "cpu", sampler=interrupted)
    assert rc == 130
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000002"]
    _assert_as_it_came(unet, before)
