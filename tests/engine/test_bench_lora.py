"""The training bench's baseline LoRA (bench/lora_baseline.py): it must cover exactly the layers and
projections MoA's low-rank expert covers, at the same rank, and leave the model as it found it;
otherwise the bench's MoA-vs-LoRA ratio compares different amounts of work."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from comfyui_moa.bench.lora_baseline import LoRA     # the pack's one import root, as the tests import it
from comfyui_moa.moa_attention.engine.adapter import init_adapter_from_unet
from comfyui_moa.moa_attention.engine.unet_layers import find_attention_layers

from support.sd_attention import CTX, DIM, Attention


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.attn1, block.attn2 = Attention(DIM), Attention(DIM, CTX)
            self.blocks.append(block)

    def forward(self, x, context):
        for block in self.blocks:
            x = x + block.attn1(x)
            x = x + block.attn2(x, context=context)
        return x


def paths(net):
    return [s.path for s in find_attention_layers(net)]


def test_lora_has_the_low_rank_experts_parameter_count_on_the_same_layers():
    net = Net()
    lora = LoRA(net, paths(net), rank=4)
    adapter = init_adapter_from_unet(net, expert="lowrank", rank=4, seed=0)
    expert_params = sum(p.numel() for w in adapter.layers.values() for p in w.expert.parameters())
    assert len(paths(net)) == 4 and len(lora.deltas) == 16
    assert sum(p.numel() for p in lora.parameters()) == expert_params


def test_fresh_lora_is_the_base_model_and_the_model_comes_back_as_it_was():
    net = Net().eval()
    x, ctx = torch.randn(2, 9, DIM), torch.randn(2, 5, CTX)
    originals = [m for m in net.modules() if isinstance(m, nn.Linear)]
    before = net(x, ctx)
    lora = LoRA(net, paths(net), rank=4)
    with torch.no_grad(), lora.installed():
        assert torch.equal(net(x, ctx), before)
        for delta in lora.deltas:
            delta.up.weight.normal_()
        changed = net(x, ctx)
    assert (changed - before).abs().max() > 0.1
    assert [m for m in net.modules() if isinstance(m, nn.Linear)] == originals
    assert torch.equal(net(x, ctx), before)


def test_lora_trains_only_its_deltas():
    net = Net().requires_grad_(False)
    lora = LoRA(net, paths(net), rank=4)
    with lora.installed():
        net(torch.randn(1, 9, DIM), torch.randn(1, 5, CTX)).square().mean().backward()
    assert all(p.grad is not None for p in lora.deltas.parameters())
    assert all(p.grad is None for p in net.parameters())


def test_lora_without_layers_is_refused():
    with pytest.raises(ValueError, match="no attention layer paths"):
        LoRA(Net(), [], rank=4)
