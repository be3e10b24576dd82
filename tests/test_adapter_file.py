"""The MoA adapter file (moa_attention/engine/adapter_file.py): exact round-trips, documented keys and
metadata, no overwriting, read-only loading, never unpickling, and a clear AdapterFileError
(naming the file and the fix) for every kind of bad file.

Adapters are built on the real tiny SD1.5 UNet (model_channels 32) with a small fusion MLP so
files stay small; every parameter is randomized so that a round-trip of zeros cannot pass by luck.
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FUSION_HIDDEN = 64          # not the default (768): proves the loader reads it from the header
TRAINING = {"steps": 1200, "lr": 0.0001, "subjects": ["dog", "cat"], "note": "ünïcödé", "nested": {"a": [1, 2]}}
ATTN2_PATH = "input_blocks.1.1.transformer_blocks.0.attn2"


# --------------------------------------------------------------------------- fixtures / helpers

def _unet(model_channels: int = 32, levels: int = 2, **overrides):
    from support.model_factory import build_sd15_model_patcher, tiny_unet_config
    cfg = tiny_unet_config(model_channels=model_channels, levels=levels, transformer_depth_middle=True)
    cfg.update(overrides)
    return build_sd15_model_patcher(cfg, seed=0).get_model_object("diffusion_model")


@pytest.fixture(scope="module")
def io(pack):
    from comfyui_moa.moa_attention.engine import adapter_file
    return adapter_file


@pytest.fixture(scope="module")
def unet(pack):
    """The tiny_model fixture's diffusion model (same config and seed), built once for this file."""
    return _unet()


def _make_adapter(unet, expert: str, rank: int = 16, seed: int = 0):
    from comfyui_moa.moa_attention.engine.adapter import init_adapter_from_unet
    adapter = init_adapter_from_unet(unet, expert=expert, rank=rank, fusion_hidden=FUSION_HIDDEN,
                                     training=TRAINING)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return adapter


@pytest.fixture(scope="module")
def adapters(unet):
    return {"full": _make_adapter(unet, "full"), "lowrank": _make_adapter(unet, "lowrank")}


@pytest.fixture
def good_file(io, adapters, tmp_path):
    return io.save_adapter(adapters["lowrank"], tmp_path / "subject.safetensors", dtype=torch.float32)


def _snapshot(path: Path):
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns, st.st_size


def _write(io, adapter, path: Path, *, meta=None, tensors=None) -> Path:
    """A hand-made adapter file: the real keys/metadata, then edited."""
    t = {k: v.detach().float().contiguous() for k, v in io.file_state_dict(adapter).items()}
    m = io.metadata_of(adapter.config)
    if tensors:
        tensors(t)
    if meta:
        meta(m)
    save_file(t, str(path), metadata=m)
    return path


def _refused(io, path: Path, pattern: str):
    """load_adapter must refuse with AdapterFileError naming the file, matching `pattern`,
    and leave the file exactly as it was."""
    before = _snapshot(path) if path.exists() else None
    with pytest.raises(io.AdapterFileError, match=pattern) as info:
        io.load_adapter(path)
    msg = str(info.value)
    assert f"'{path.name}'" in msg and str(path) in msg, msg
    if before is not None:
        assert _snapshot(path) == before, "loading a bad file modified it"
    return msg


# --------------------------------------------------------------------------- 1. round-trip

@pytest.mark.parametrize("expert", ["full", "lowrank"])
def test_float32_round_trip_is_exact_with_metadata(io, adapters, tmp_path, expert):
    adapter = adapters[expert]
    path = io.save_adapter(adapter, tmp_path / f"{expert}.safetensors", dtype=torch.float32)
    loaded = io.load_adapter(path)

    want, got = adapter.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == torch.float32, k
        assert torch.equal(got[k], want[k]), k

    c, lc = adapter.config, loaded.config
    assert lc.layers == c.layers and len(lc.layers) == 14
    assert (lc.expert, lc.base, lc.image_encoder) == (expert, "sd15", "clip_vit_l14")
    assert (lc.text_dim, lc.image_dim, lc.fusion_hidden) == (768, 768, FUSION_HIDDEN)
    assert lc.rank == (16 if expert == "lowrank" else 0)
    assert lc.training == TRAINING
    assert not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())

    meta = io.read_adapter_metadata(path)
    assert meta["moa.format"] == "comfyui-moa"
    assert meta["moa.format_version"] == "1" and io.FORMAT_VERSION == 4     # SD1.5 files stay version 1
    assert set(meta) == set(io.METADATA_KEYS) - {"moa.text_streams", "moa.identity_tokens", "moa.prompt_schedule"}
    assert meta["moa.base"] == "sd15" and meta["moa.expert"] == expert
    assert json.loads(meta["moa.layers"])[1] == [ATTN2_PATH, "attn2", 32, 768, 32, 8]
    assert json.loads(meta["moa.training"]) == TRAINING


def test_identity_tokens_round_trip_in_format_3(io, unet, tmp_path):
    """Several identity tokens per subject: format 3 with the count in the header, the fusion's
    fc2 K times as wide; a header that claims another count is refused by the fc2 shape."""
    from comfyui_moa.moa_attention.engine.adapter import init_adapter_from_unet
    adapter = init_adapter_from_unet(unet, rank=4, fusion_hidden=FUSION_HIDDEN, identity_tokens=3)
    with torch.no_grad():
        adapter.fusion.fc2.weight.normal_()
    path = io.save_adapter(adapter, tmp_path / "k3.safetensors", dtype=torch.float32)
    meta = io.read_adapter_metadata(path)
    assert (meta["moa.format_version"], meta["moa.identity_tokens"]) == ("3", "3")
    assert load_file(str(path))["fusion.fc2.weight"].shape == (3 * 768, FUSION_HIDDEN)
    loaded = io.load_adapter(path)
    assert loaded.config.identity_tokens == 3 == loaded.fusion.tokens
    assert torch.equal(loaded.fusion.fc2.weight, adapter.fusion.fc2.weight)
    path2 = _write(io, adapter, tmp_path / "k2.safetensors", meta=_set("moa.identity_tokens", "2"))
    _refused(io, path2, r"tensor fusion\.fc2\.bias has shape \[2304\], the header's layers need \[1536\]")


def test_file_uses_documented_key_names_and_shapes(io, adapters, tmp_path):
    full = load_file(str(io.save_adapter(adapters["full"], tmp_path / "f.safetensors", dtype=torch.float32)))
    low = load_file(str(io.save_adapter(adapters["lowrank"], tmp_path / "l.safetensors", dtype=torch.float32)))
    p = ATTN2_PATH
    for sd in (full, low):
        assert sd[f"{p}.router.fc1.weight"].shape == (8, 32) and sd[f"{p}.router.fc1.bias"].shape == (8,)
        assert sd[f"{p}.router.fc2.weight"].shape == (2, 8) and sd[f"{p}.router.fc2.bias"].shape == (2,)
        assert sd["fusion.norm.weight"].shape == (768,) and sd["fusion.norm.bias"].shape == (768,)
        assert sd["fusion.fc1.weight"].shape == (FUSION_HIDDEN, 1536)
        assert sd["fusion.fc2.weight"].shape == (768, FUSION_HIDDEN)
        assert not any(".proj." in k or k.startswith("layers.") for k in sd)
    assert full[f"{p}.expert.to_q.weight"].shape == (32, 32)
    assert full[f"{p}.expert.to_k.weight"].shape == (32, 768)
    assert full[f"{p}.expert.to_v.weight"].shape == (32, 768)
    assert full[f"{p}.expert.to_out.weight"].shape == (32, 32) and full[f"{p}.expert.to_out.bias"].shape == (32,)
    assert low[f"{p}.expert.to_k.down"].shape == (16, 768) and low[f"{p}.expert.to_k.up"].shape == (32, 16)
    assert low[f"{p}.expert.to_out.down"].shape == (16, 32) and low[f"{p}.expert.to_out.up"].shape == (32, 16)
    assert not any(k.endswith(".bias") and ".expert." in k for k in low)
    n_layers = 14
    assert len(full) == n_layers * (4 + 5) + 6 and len(low) == n_layers * (4 + 8) + 6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_save_round_trips_to_rounded_values(io, adapters, tmp_path, dtype):
    adapter = adapters["full"]
    path = io.save_adapter(adapter, tmp_path / "half.safetensors", dtype=dtype)
    with safe_open(str(path), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}
    loaded = io.load_adapter(path)
    got = loaded.state_dict()
    changed = False
    for k, v in adapter.state_dict().items():
        rounded = v.to(dtype).float()
        assert got[k].dtype == torch.float32, k
        assert torch.equal(got[k], rounded), k
        changed |= not torch.equal(rounded, v)
    assert changed, "random weights should not all be exactly representable"


def test_save_default_dtype_is_float16(io, adapters, tmp_path):
    path = io.save_adapter(adapters["lowrank"], tmp_path / "default.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


# --------------------------------------------------------------------------- 2. overwrite / read-only

def test_save_refuses_to_overwrite_without_flag(io, adapters, tmp_path):
    path = io.save_adapter(adapters["lowrank"], tmp_path / "mine.safetensors", dtype=torch.float32)
    before = _snapshot(path)
    with pytest.raises(FileExistsError, match="--force") as info:
        io.save_adapter(adapters["full"], path, dtype=torch.float32)
    assert str(path) in str(info.value) and "overwrite=True" in str(info.value)
    assert _snapshot(path) == before
    assert sorted(os.listdir(tmp_path)) == ["mine.safetensors"]   # no temp file left behind

    io.save_adapter(adapters["full"], path, dtype=torch.float32, overwrite=True)
    assert io.load_adapter(path).config.expert == "full"
    assert sorted(os.listdir(tmp_path)) == ["mine.safetensors"]


def test_failed_save_leaves_existing_file_and_no_temp(io, adapters, tmp_path, monkeypatch):
    path = io.save_adapter(adapters["lowrank"], tmp_path / "mine.safetensors", dtype=torch.float32)
    before = _snapshot(path)

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half an adapter")
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_adapter(adapters["full"], path, dtype=torch.float32, overwrite=True)
    assert _snapshot(path) == before
    assert sorted(os.listdir(tmp_path)) == ["mine.safetensors"]
    monkeypatch.undo()

    with pytest.raises(ValueError, match="int8"):
        io.save_adapter(adapters["full"], tmp_path / "other.safetensors", dtype=torch.int8)
    assert sorted(os.listdir(tmp_path)) == ["mine.safetensors"]


def test_loading_never_modifies_the_file(io, good_file):
    os.utime(good_file, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    before = _snapshot(good_file)
    io.read_adapter_metadata(good_file)
    io.load_adapter(good_file)
    io.load_adapter(str(good_file))
    assert _snapshot(good_file) == before
    assert sorted(os.listdir(good_file.parent)) == [good_file.name]


# --------------------------------------------------------------------------- 3. bad files

def test_missing_file(io, tmp_path):
    msg = _refused(io, tmp_path / "nowhere.safetensors", r"file not found\. Put the adapter in ComfyUI/models/moa")
    assert not (tmp_path / "nowhere.safetensors").exists()
    with pytest.raises(io.AdapterFileError, match="file not found"):
        io.read_adapter_metadata(tmp_path)          # a directory is not an adapter file either
    assert "nowhere.safetensors" in msg


class _Trap:
    """Unpickling this creates the marker file (builtins.open(marker, 'w'))."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name,zipfile", [("pickled.safetensors", True), ("legacy.ckpt", False)])
def test_pickle_is_refused_and_never_unpickled(io, tmp_path, name, zipfile):
    marker = tmp_path / "unpickled.marker"
    path = tmp_path / name
    torch.save({"state_dict": {"w": torch.ones(2)}, "trap": _Trap(marker)}, path,
               _use_new_zipfile_serialization=zipfile)
    _refused(io, path, r"a pickle \(\.ckpt/\.pt/\.bin\) file, which MoA never loads.*"
                       r"Use the \.safetensors adapter written by the MoA trainer")
    with pytest.raises(io.AdapterFileError, match="pickle"):
        io.read_adapter_metadata(path)
    assert not marker.exists(), "the adapter loader unpickled a file"
    # the trap is real: unpickling the same bytes does create the marker
    # (under a .pt name: torch.load hands *.safetensors names to safetensors)
    copy = tmp_path / "copy.pt"
    copy.write_bytes(path.read_bytes())
    torch.load(copy, weights_only=False)
    assert marker.exists()


def test_random_bytes(io, tmp_path):
    data = random.Random(0).randbytes(4096)
    assert data[:1] != b"\x80" and data[:2] != b"PK"
    path = tmp_path / "noise.safetensors"
    path.write_bytes(data)
    _refused(io, path, r"not a readable safetensors file, or truncated/corrupt \(4096 bytes.*"
                       r"Copy or download the adapter again")


@pytest.mark.parametrize("where", ["half", "header", "length-prefix", "empty"])
def test_truncated_adapter(io, good_file, tmp_path, where):
    data = good_file.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    assert 8 + header_len < len(data) // 2
    cut = {"half": len(data) // 2, "header": 8 + header_len // 2, "length-prefix": 5, "empty": 0}[where]
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:cut])
    _refused(io, path, rf"truncated/corrupt \({cut} bytes.*Copy or download the adapter again")


@pytest.mark.parametrize("metadata", [{"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"},
                                      None], ids=["lora", "no-metadata"])
def test_safetensors_that_is_not_a_moa_adapter(io, tmp_path, metadata):
    path = tmp_path / "some_lora.safetensors"
    save_file({"lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 768),
               "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(320, 4)},
              str(path), metadata=metadata)
    _refused(io, path, r"not a MoA adapter.*may be a LoRA.*Put only adapters written by the MoA trainer in models/moa")


def _set(key, value):
    def edit(m):
        m[key] = value
    return edit


def _drop(key):
    def edit(m):
        del m[key]
    return edit


BAD_METADATA = [
    ("future-version", _set("moa.format_version", "99"),
     r"written in adapter format 99, this comfyui-moa reads up to 4\. Update comfyui-moa"),
    ("version-not-a-number", _set("moa.format_version", "one"),
     r"unreadable format version 'one'\. Re-export the adapter with the MoA trainer"),
    ("sdxl-base-in-format-1", _set("moa.base", "sdxl"),
     r"an SDXL adapter in format 1; SDXL adapters are format 2\. Re-export the adapter with the MoA trainer"),
    ("unknown-base", _set("moa.base", "sd35"),
     r"made for base model 'sd35', which this comfyui-moa does not know \(it knows 'sd15', 'sdxl'\)\. "
     r"Update comfyui-moa"),
    ("sdxl-text-dim", _set("moa.text_dim", "2048"),
     r"text embedding width 2048, SD1\.5 uses 768.*Use an adapter trained on an SD1\.5 checkpoint"),
    ("layers-bad-json", lambda m: m.__setitem__("moa.layers", m["moa.layers"][:-7]),
     r"header metadata is incomplete or malformed \(JSONDecodeError.*Re-export the adapter"),
    ("layers-short-row", _set("moa.layers", json.dumps([[ATTN2_PATH, "attn2", 32, 768, 32]])),
     r"header metadata is incomplete or malformed \(ValueError.*Re-export the adapter"),
    ("layers-not-rows", _set("moa.layers", "[1, 2]"),
     r"header metadata is incomplete or malformed \(TypeError.*Re-export the adapter"),
    ("no-expert-key", _drop("moa.expert"),
     r"header metadata is incomplete or malformed \(KeyError.*Re-export the adapter"),
    ("rank-not-a-number", _set("moa.rank", "sixteen"),
     r"header metadata is incomplete or malformed \(ValueError.*Re-export the adapter"),
    ("unknown-expert", _set("moa.expert", "dense"), r"unknown expert kind 'dense'.*Re-export the adapter"),
    ("identity-tokens-in-format-1", _set("moa.identity_tokens", "2"),
     r"2 identity tokens per subject in a format 1 header \(1 or more, and more than 1 only from format 3 on\)\. "
     r"Re-export the adapter"),
    ("no-identity-tokens", _set("moa.identity_tokens", "0"), r"0 identity tokens per subject.*Re-export the adapter"),
    ("negative-rank", _set("moa.rank", "-1"),
     r"header metadata is incomplete or malformed \(RuntimeError.*negative dimension.*Re-export the adapter"),
    ("negative-width", _set("moa.layers", json.dumps([[ATTN2_PATH, "attn2", 32, -768, 32, 8]])),
     r"header metadata is incomplete or malformed \(RuntimeError.*negative dimension.*Re-export the adapter"),
]


@pytest.mark.parametrize("edit,pattern", [b[1:] for b in BAD_METADATA], ids=[b[0] for b in BAD_METADATA])
def test_bad_metadata(io, adapters, tmp_path, edit, pattern):
    path = _write(io, adapters["lowrank"], tmp_path / "edited.safetensors", meta=edit)
    _refused(io, path, pattern)


def _widen(key):
    def edit(t):
        shape = list(t[key].shape)
        shape[0] += 1
        t[key] = torch.zeros(shape)
    return edit


BAD_TENSORS = [
    ("missing-key", lambda t: t.pop(f"{ATTN2_PATH}.expert.to_k.up"),
     rf"do not match its header: 1 missing key\(s\), e\.g\. \['{re.escape(ATTN2_PATH)}\.expert\.to_k\.up'\]"
     r".*export it again with the MoA trainer"),
    ("unexpected-key", lambda t: t.__setitem__("lora_te_text_model.alpha", torch.ones(1)),
     r"do not match its header: 1 unexpected key\(s\), e\.g\. \['lora_te_text_model\.alpha'\]"),
    ("missing-and-unexpected", lambda t: t.__setitem__("extra", t.pop("fusion.fc2.bias")),
     r"1 missing key\(s\), e\.g\. \['fusion\.fc2\.bias'\]; 1 unexpected key\(s\), e\.g\. \['extra'\]"),
    ("wrong-shape", _widen(f"{ATTN2_PATH}.router.fc1.weight"),
     rf"tensor {re.escape(ATTN2_PATH)}\.router\.fc1\.weight has shape \[9, 32\], the header's layers need "
     r"\[8, 32\]\. Export it again with the MoA trainer"),
    ("int64", lambda t: t.__setitem__("fusion.fc1.bias", torch.arange(FUSION_HIDDEN)),
     r"tensor fusion\.fc1\.bias has dtype torch\.int64; adapters hold float16/bfloat16/float32\. Export it again"),
    ("float64", lambda t: t.__setitem__("fusion.fc1.bias", t["fusion.fc1.bias"].double()),
     r"tensor fusion\.fc1\.bias has dtype torch\.float64"),
]


@pytest.mark.parametrize("edit,pattern", [b[1:] for b in BAD_TENSORS], ids=[b[0] for b in BAD_TENSORS])
def test_bad_tensors(io, adapters, tmp_path, edit, pattern):
    path = _write(io, adapters["lowrank"], tmp_path / "edited.safetensors", tensors=edit)
    _refused(io, path, pattern)


def test_header_from_another_adapter_is_refused(io, adapters, tmp_path):
    """Full-expert tensors under a lowrank header: the key sets differ, nothing is half-loaded."""
    full = {k: v.float().contiguous() for k, v in io.file_state_dict(adapters["full"]).items()}
    path = tmp_path / "mixed.safetensors"
    save_file(full, str(path), metadata=io.metadata_of(adapters["lowrank"].config))
    msg = _refused(io, path, r"missing key\(s\).*unexpected key\(s\)")
    assert "112 missing" in msg and "70 unexpected" in msg   # 14 layers x (8 lowrank, 5 full expert keys)


def test_unchanged_hand_written_file_loads(io, adapters, tmp_path):
    """The helpers above only break what each case edits: the unedited file is accepted."""
    path = _write(io, adapters["lowrank"], tmp_path / "plain.safetensors")
    loaded = io.load_adapter(path)
    for k, v in adapters["lowrank"].state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


# --------------------------------------------------------------------------- 4. check_adapter_fits

def test_adapter_fits_its_own_architecture(io, adapters, unet, good_file):
    from comfyui_moa.moa_attention.engine.unet_layers import find_attention_layers
    layers = find_attention_layers(unet)
    other_weights = find_attention_layers(_unet())      # same architecture, separately built
    for adapter in (*adapters.values(), io.load_adapter(good_file)):
        assert io.check_adapter_fits(adapter, layers, "subject.safetensors") is None
        assert io.check_adapter_fits(adapter, other_weights, "subject.safetensors") is None


def test_adapter_refused_on_wider_unet(io, adapters):
    from comfyui_moa.moa_attention.engine.unet_layers import find_attention_layers
    wide = find_attention_layers(_unet(model_channels=64))
    with pytest.raises(io.AdapterFileError) as info:
        io.check_adapter_fits(adapters["lowrank"], wide, "subject.safetensors", "the checkpoint 'wide'")
    msg = str(info.value)
    assert msg.startswith("MoA adapter 'subject.safetensors' does not fit the checkpoint 'wide': ")
    assert ("layer input_blocks.1.1.transformer_blocks.0.attn1: adapter expects query/context/inner width "
            "32/32/32, 8 heads, model has 64/64/64, 8 heads") in msg
    assert "SD1.5 adapters need an SD1.5 checkpoint" in msg
    assert "not in the model" not in msg and "adapter lacks" not in msg


def test_adapter_refused_on_other_context_dim(io, adapters):
    from comfyui_moa.moa_attention.engine.unet_layers import find_attention_layers
    sd2_like = find_attention_layers(_unet(context_dim=1024))
    with pytest.raises(io.AdapterFileError,
                       match=rf"layer {re.escape(ATTN2_PATH)}: adapter expects query/context/inner width "
                             r"32/768/32, 8 heads, model has 32/1024/32, 8 heads"):
        io.check_adapter_fits(adapters["full"], sd2_like, "subject.safetensors")


def test_adapter_refused_on_other_depth(io, adapters, unet):
    from comfyui_moa.moa_attention.engine.unet_layers import find_attention_layers
    layers = find_attention_layers(unet)
    with pytest.raises(io.AdapterFileError,
                       match=r"2 adapter layer\(s\) not in the model, e\.g\. middle_block\.1\.transformer_blocks"):
        io.check_adapter_fits(adapters["full"], [s for s in layers if not s.path.startswith("middle_block")], "a")
    from comfyui_moa.moa_attention.engine.adapter import AdapterConfig, MoAAdapter
    small = MoAAdapter(AdapterConfig(layers=layers[:4], fusion_hidden=FUSION_HIDDEN))
    with pytest.raises(io.AdapterFileError,
                       match=r"10 model layer\(s\) the adapter lacks, e\.g\. middle_block\.1\.transformer_blocks\.0"
                             r"\.attn1"):
        io.check_adapter_fits(small, layers, "a")


def test_adapter_refused_on_other_head_count(io, adapters):
    """Same widths, different heads (SD1.5 UNets cannot be built so, hence edited specs): refused,
    and the message must show what differs instead of two identical width triples."""
    import dataclasses
    layers = adapters["full"].config.layers
    four_heads = [dataclasses.replace(s, heads=4) for s in layers]
    with pytest.raises(io.AdapterFileError, match=r"layer input_blocks\.1\.1\.transformer_blocks\.0\.attn1: adapter "
                                                  r"expects .*32/32/32, 8 heads, model has 32/32/32, 4 heads"):
        io.check_adapter_fits(adapters["full"], four_heads, "a")
