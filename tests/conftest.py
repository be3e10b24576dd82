"""Test harness: the real ComfyUI (in-process and as a headless server) on tiny SD1.5 models.

- `comfy` (session): ComfyUI 0.3.75 from .dev/ComfyUI imported in-process, CPU, SDPA attention,
  its built-in nodes registered, and this pack imported as the package `comfyui_moa` (its only
  name in a test session: a top-level `moa_attention` import is refused).
- `tiny_model`: a 2-level SD1.5-architecture UNet (model_channels 32) built without files.
- `sdxl_model`, `sdxl_clip`, `tiny_vision` (session): a tiny SDXL-architecture MODEL, an SDXL
  CLIP (clip_l + clip_g, shallow) and a shallow CLIP ViT-L/14 vision model, built in-process.
- `models_base` (session): a ComfyUI base directory with real .safetensors files in models/.
- `server_inputs` (session): photos + masks in the base's input/ and a tiny adapter in models/moa.
- `server` (session): ComfyUI's main.py on a free loopback port with the pack in custom_nodes.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support import runtime  # noqa: E402
from support.runtime import COMFY_DIR, ROOT  # noqa: E402
from support.waits import minutes, wait_for  # noqa: E402

# every test imports the pack as `comfyui_moa`, the name its nodes run under (one copy of each module)
runtime.register_pack()
# the repository root for `experiments`; appended, because ComfyUI's own `nodes` module must win
# over this pack's `nodes/` folder
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))


def _import_comfy():
    try:
        return runtime.import_comfy()
    except runtime.ComfyUIMissing as e:
        pytest.exit(str(e), returncode=3)


def _import_pack():
    return runtime.import_pack()


@pytest.fixture(scope="session")
def comfy():
    import asyncio
    nodes = _import_comfy()
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    pack = _import_pack()
    return nodes, pack


@pytest.fixture(scope="session")
def pack(comfy):
    return comfy[1]


@pytest.fixture
def tiny_unet_config():
    from support.model_factory import tiny_unet_config
    return tiny_unet_config(model_channels=32, levels=2, transformer_depth_middle=True)


@pytest.fixture
def tiny_model(comfy, tiny_unet_config):
    from support.model_factory import build_sd15_model_patcher
    return build_sd15_model_patcher(tiny_unet_config, seed=0)


@pytest.fixture(scope="session")
def sdxl_model(comfy):
    from support.model_factory import build_sdxl_model_patcher, tiny_sdxl_unet_config
    return build_sdxl_model_patcher(tiny_sdxl_unet_config())


@pytest.fixture(scope="session")
def sdxl_clip(comfy):
    from support.model_factory import build_tiny_clip
    return build_tiny_clip("sdxl")


@pytest.fixture(scope="session")
def tiny_vision(comfy):
    from support.model_factory import build_tiny_clip_vision
    return build_tiny_clip_vision("clip_vision_config_vitl.json", layers=2)   # encode_image reads layer -2


@pytest.fixture(scope="session")
def models_base(tmp_path_factory, comfy):
    """A ComfyUI base directory whose models/ holds the tiny real files; shared by all tests."""
    from support.model_factory import prepare_models_tree
    base = tmp_path_factory.mktemp("comfy_base")
    info = prepare_models_tree(base)
    (base / "custom_nodes").mkdir(exist_ok=True)
    (base / "custom_nodes" / "comfyui-moa").symlink_to(ROOT, target_is_directory=True)
    (base / "user" / "default").mkdir(parents=True, exist_ok=True)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps({
        "Comfy.TutorialCompleted": True, "Comfy.Workflow.Persist": False,
        "Comfy.Window.UnloadConfirmation": False, "Comfy.Notification.ShowVersionUpdates": False}))
    import folder_paths
    for kind in ("checkpoints", "clip_vision", "vae", "loras", "moa"):
        folder_paths.add_model_folder_path(kind, str(base / "models" / kind), is_default=True)
    return base, info


@pytest.fixture(scope="session")
def server_inputs(models_base, comfy):
    """Photos in input/ and an adapter for the tiny checkpoint in models/moa (shared by the server tests)."""
    from support.graphs import ADAPTER, CHECKPOINT, write_inputs
    base, _ = models_base
    write_inputs(base / "input")
    nodes, pack = comfy
    from comfyui_moa.moa_attention.engine.adapter import init_adapter_from_unet
    from comfyui_moa.moa_attention.engine.adapter_file import save_adapter
    model = nodes.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT)[0]
    write_trained_looking_adapter(model, base / "models" / "moa" / ADAPTER)
    # for the error cases: an adapter made for a 1024-d image encoder, and an SD2-shaped UNet
    other = init_adapter_from_unet(model.get_model_object("diffusion_model"), expert="lowrank", rank=2, seed=1,
                                   image_encoder="clip_vit_h14", image_dim=1024)
    save_adapter(other, base / "models" / "moa" / "vit_h_moa.safetensors", overwrite=True)
    from support.model_factory import tiny_unet_config, write_unet_only
    sd2 = tiny_unet_config(model_channels=320, levels=1)
    sd2.update(context_dim=1024, use_linear_in_transformer=True, num_head_channels=64)
    sd2.pop("num_heads", None)
    write_unet_only(base / "models" / "unet" / "tiny_sd2_unet.safetensors", unet_config=sd2)
    return base


def write_trained_looking_adapter(model, path: Path) -> None:
    """An adapter for `model` (a MODEL) whose personal weights differ from the prior's and whose
    routers are half-decided, as a trained one's are."""
    import torch
    from comfyui_moa.moa_attention.engine.adapter import init_adapter_from_unet
    from comfyui_moa.moa_attention.engine.adapter_file import save_adapter
    adapter = init_adapter_from_unet(model.get_model_object("diffusion_model"), expert="lowrank", rank=4, seed=0)
    g = torch.Generator().manual_seed(0)
    for w in adapter.layers.values():
        for p in w.expert.parameters():
            p.data.add_(torch.randn(p.shape, generator=g) * 0.05)
        w.router.fc2.bias.data = torch.tensor([0.0, 0.5])
    save_adapter(adapter, path, overwrite=True)


@pytest.fixture(scope="session")
def sdxl_server_inputs(server_inputs, comfy):
    """For the SDXL workflows: a checkpoint file ComfyUI loads as SDXL in models/checkpoints and an
    adapter for it in models/moa (names in support.graphs)."""
    import comfy.sd
    from support.graphs import SDXL_ADAPTER, SDXL_CHECKPOINT
    from support.model_factory import write_tiny_sdxl_checkpoint
    base = server_inputs
    path = write_tiny_sdxl_checkpoint(base / "models" / "checkpoints" / SDXL_CHECKPOINT)
    model = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]
    write_trained_looking_adapter(model, base / "models" / "moa" / SDXL_ADAPTER)
    return base


@pytest.fixture(scope="session")
def app_inputs(server_inputs, comfy):
    """For the applications (swap, morph, regions, LoRA, ControlNet): a photo, region masks and a pose in
    input/, a style LoRA in models/loras and a ControlNet in models/controlnet, all for the tiny checkpoint."""
    from support import app_graphs
    from support.model_factory import tiny_unet_config, unet_state_dict
    base = server_inputs
    app_graphs.write_app_inputs(base / "input")
    app_graphs.write_lora(base / "models" / "loras" / app_graphs.LORA, unet_state_dict(tiny_unet_config()))
    app_graphs.write_controlnet(base / "models" / "controlnet" / app_graphs.CONTROLNET, tiny_unet_config())
    app_graphs.write_smooth_unet(base / "models" / "unet" / app_graphs.SMOOTH_UNET, tiny_unet_config())
    return base


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A real ComfyUI server process; graphs are posted to its HTTP API."""

    def __init__(self, base: Path, log_path: Path) -> None:
        self.base = base
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.client_id = uuid.uuid4().hex
        self._log = open(log_path, "wb")
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(base), "--disable-auto-launch", "--use-pytorch-cross-attention",
               "--database-url", "sqlite:///:memory:", "--disable-api-nodes"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=COMFY_DIR, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def log_tail(self, chars: int = 6000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def request(self, path: str, body: dict | None = None, timeout: float = minutes(5)):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return json.loads(raw) if raw and r.headers.get_content_type() == "application/json" else raw

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")

    def _answers(self) -> bool:
        try:
            self.request("/system_stats", timeout=minutes(1))
            return True
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def wait_ready(self, budget_minutes: float = 10) -> None:
        """Until GET /system_stats answers (or the process dies)."""
        try:
            wait_for(self._answers, "ComfyUI answering /system_stats", budget_minutes, poll=0.5, alive=self._alive)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{self.log_tail()}") from None

    def post(self, graph: dict) -> tuple[int, dict]:
        """POST /prompt; returns (HTTP status, JSON body) without raising on 400."""
        try:
            return 200, self.request("/prompt", {"prompt": graph, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, graph: dict, budget_minutes: float = 15) -> dict:
        """Queue a graph and wait until its history entry says success or error (returned)."""
        code, body = self.post(graph)
        if code != 200:
            raise AssertionError(f"prompt rejected with HTTP {code}: {json.dumps(body)[:3000]}")
        pid = body["prompt_id"]

        def finished():
            hist = self.request(f"/history/{pid}")
            entry = hist.get(pid) if isinstance(hist, dict) else None
            status = (entry or {}).get("status", {})
            return entry if status.get("completed") is not None and status.get("status_str") in ("success",
                                                                                               "error") else None
        return wait_for(finished, f"prompt {pid} finishing", budget_minutes, alive=self._alive)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=minutes(2))
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self._log.close()


def execution_error(entry: dict) -> dict | None:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


@pytest.fixture(scope="session")
def server(models_base, tmp_path_factory):
    base, _ = models_base
    srv = ComfyServer(base, tmp_path_factory.mktemp("server") / "comfyui.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    srv = item.funcargs.get("server") if hasattr(item, "funcargs") else None
    if report.failed and isinstance(srv, ComfyServer):
        report.sections.append(("ComfyUI server log (tail)", srv.log_tail()))
