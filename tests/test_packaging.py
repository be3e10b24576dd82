"""What the Comfy Registry and a newcomer meet first, checked with the registry's own tool
(comfy-cli, installed by scripts/dev.sh into .dev/tools) and with the dev runtime's first start."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import zipfile
from pathlib import Path

import pytest
from support.waits import minutes, wait_for

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / ".dev" / "tools" / "bin"
DEV_FILES = ("tests/", "bench/", "scripts/", "experiments/", "docs/", ".ci/", "requirements-dev.txt")


@pytest.fixture(scope="module")
def comfy_cli():
    exe = TOOLS / "comfy"
    if not exe.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"comfy-cli missing at {exe}: scripts/dev.sh setup installs it")
        pytest.skip("comfy-cli not installed (run `bash scripts/dev.sh setup`)")
    return exe


@pytest.fixture(scope="module")
def pack_copy(tmp_path_factory):
    """The working tree's tracked files in a fresh git repository (comfy node pack zips what git tracks)."""
    dest = tmp_path_factory.mktemp("registry") / "comfyui-moa"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for cmd in (["init", "-q"], ["add", "-A"]):
        subprocess.run(["git", *cmd], cwd=dest, check=True, capture_output=True)
    return dest


def comfy(exe: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COMFY_CLI_SKIP_TRACKING="1", NO_COLOR="1")
    return subprocess.run([str(exe), "--skip-prompt", "--no-enable-telemetry", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=minutes(5))


def test_registry_validation_passes_and_reads_every_link(comfy_cli, pack_copy):
    proc = comfy(comfy_cli, pack_copy, "node", "validate")
    assert proc.returncode == 0 and "validation checks passed" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    # what the registry would publish: its own parser, run in comfy-cli's Python
    code = ("import json, sys; from comfy_cli.registry.config_parser import extract_node_configuration as e; "
            "c = e(sys.argv[1]); u = c.project.urls; "
            "print(json.dumps({'name': c.project.name, 'version': c.project.version, 'license': str(c.project.license), "
            "'urls': {'homepage': u.homepage, 'documentation': u.documentation, 'repository': u.repository, "
            "'issues': u.issues}, 'publisher': c.tool_comfy.publisher_id, 'display': c.tool_comfy.display_name}))")
    out = subprocess.run([str(TOOLS / "python"), "-c", code, str(pack_copy / "pyproject.toml")],
                         capture_output=True, text=True, timeout=minutes(5))
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout.strip().splitlines()[-1])
    assert cfg["name"] == "comfyui-moa" and cfg["publisher"] == "comfyui-moa"
    empty = [k for k, v in cfg["urls"].items() if not v]
    assert not empty, f"these links would be published empty: {empty}"
    assert cfg["urls"]["issues"].endswith("/issues")


def test_the_packed_zip_holds_the_pack_and_not_the_development_files(comfy_cli, pack_copy):
    proc = comfy(comfy_cli, pack_copy, "node", "pack")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = zipfile.ZipFile(pack_copy / "node.zip").namelist()
    for needed in ("__init__.py", "nodes/__init__.py", "moa_attention/engine/layer.py", "moa_attention/train.py",
                   "pyproject.toml", "requirements.txt", "README.md", "LICENSE"):
        assert needed in names, f"{needed} missing from the zip"
    workflows = [n for n in names if n.startswith("workflows/") and n.endswith(".json")]
    assert len(workflows) >= 3, workflows
    leaked = sorted(n for n in names if n.startswith(DEV_FILES) or n in DEV_FILES)
    assert not leaked, f"development files in the zip users download: {leaked[:10]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_first_start_of_the_readme_command_logs_no_import_failure(tmp_path):
    """`bash scripts/dev.sh run`, as a newcomer starts it: ComfyUI loads every built-in node file
    and this pack without IMPORT FAILED, tracebacks or 'pip install' hints."""
    import urllib.request
    port = _free_port()
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "dev.sh"), "run"], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env=dict(os.environ, MOA_PORT=str(port)),
                                start_new_session=True)

    def alive():
        assert proc.poll() is None, log.read_text()[-4000:]

    def answers():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/object_info/MoAApply", timeout=minutes(1)) as r:
                return json.loads(r.read())
        except OSError:
            return None
    try:
        info = wait_for(answers, "the dev server answering /object_info/MoAApply", budget_minutes=15, poll=0.5,
                        alive=alive)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=minutes(2))
    assert "MoAApply" in info
    text = log.read_text(errors="replace")
    for bad in ("IMPORT FAILED", "Traceback", "pip install -r requirements.txt", "Cannot import"):
        assert bad not in text, f"{bad!r} in the first start's log:\n{text[-4000:]}"
    assert "comfyui-moa" in text or "custom_nodes" in text, text[-4000:]
