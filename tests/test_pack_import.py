"""Loading the pack the way ComfyUI does: registration only, nothing else touched."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support.waits import minutes

ROOT = Path(__file__).resolve().parents[1]
COMFY = ROOT / ".dev" / "ComfyUI"

PROBE = r"""
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import utils.extra_config
import nodes, folder_paths
before_nodes = set(nodes.NODE_CLASS_MAPPINGS)
before_folders = {k: [list(v[0]), sorted(v[1])] for k, v in folder_paths.folder_names_and_paths.items()}
before_modules = set(sys.modules)
t = time.perf_counter()
ok = asyncio.run(nodes.load_custom_node(sys.argv[2]))
seconds = time.perf_counter() - t
after_folders = {k: [list(v[0]), sorted(v[1])] for k, v in folder_paths.folder_names_and_paths.items()}
from comfy_config import config_parser
cfg = config_parser.extract_node_configuration(sys.argv[2])
print("RESULT" + json.dumps({
    "ok": ok, "seconds": seconds,
    "new_nodes": sorted(set(nodes.NODE_CLASS_MAPPINGS) - before_nodes),
    "display": {k: nodes.NODE_DISPLAY_NAME_MAPPINGS.get(k) for k in set(nodes.NODE_CLASS_MAPPINGS) - before_nodes},
    "changed_folders": sorted(k for k in after_folders if before_folders.get(k) != after_folders[k]),
    "moa_folder": after_folders.get("moa"),
    "new_modules": sorted(m.split(".")[0] for m in set(sys.modules) - before_modules),
    "project": {"name": cfg.project.name, "version": cfg.project.version,
                "publisher": cfg.tool_comfy.publisher_id, "display": cfg.tool_comfy.display_name},
}))
"""


def test_comfyui_loads_the_pack_with_registration_only():
    proc = subprocess.run([sys.executable, "-c", PROBE, str(COMFY), str(ROOT)], capture_output=True, text=True,
                          timeout=minutes(5), cwd=COMFY)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(line[len("RESULT"):])
    assert r["ok"] is True
    assert r["new_nodes"] and all(n.startswith("MoA") for n in r["new_nodes"])
    assert {"MoAAdapterLoader", "MoASubject", "MoAApply", "MoARouterMaps"} <= set(r["new_nodes"])
    assert all(d and d.startswith("MoA ") for d in r["display"].values())
    # only our own model folders are added; nothing of ComfyUI's is rewritten
    assert set(r["changed_folders"]) <= {"moa", "insightface"}
    assert r["moa_folder"][0][0].endswith("models/moa") and ".safetensors" in r["moa_folder"][1]
    # heavy optional dependencies are imported only when a node needs them
    for heavy in ("insightface", "onnxruntime", "cv2", "selenium"):
        assert heavy not in r["new_modules"], f"importing the pack imported {heavy}"
    assert r["project"] == {"name": "comfyui-moa", "version": "0.1.0", "publisher": "comfyui-moa",
                            "display": "MoA: Mixture-of-Attention subjects"}
    print(f"pack import took {r['seconds']:.3f} s")
