"""The example workflows in workflows/: valid for the current node definitions, listed as templates, and
runnable from the real graph editor (headless Chromium) on the tiny test models.

The browser tests skip when Chromium/chromedriver/selenium are missing, except under CI (env CI=true), where
they fail instead: install them with `bash scripts/dev.sh setup`."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, execution_error
from support.browser import browser_missing, console_errors, open_editor, start_chromium
from support.app_graphs import CONTROLNET, LORA
from support.graphs import ADAPTER, CHECKPOINT, CLIP_VISION, SDXL_ADAPTER, SDXL_CHECKPOINT

PACK_DIR_NAME = "comfyui-moa"            # the pack's folder name in the server's custom_nodes (see models_base)
WORKFLOW_DIR = ROOT / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}     # node types with no Python class
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

# The example workflows name the real files a user has; the test swaps in the tiny ones written by
# models_base / server_inputs (write_inputs). A new image name in a workflow must be added here.
MODEL_NAMES = {"ckpt_name": CHECKPOINT, "clip_name": CLIP_VISION, "adapter_name": ADAPTER, "lora_name": LORA,
               "control_net_name": CONTROLNET}
#: the SDXL workflows (named moa_sdxl_*) run on the tiny SDXL checkpoint and an adapter made for it
SDXL_MODEL_NAMES = {**MODEL_NAMES, "ckpt_name": SDXL_CHECKPOINT, "adapter_name": SDXL_ADAPTER}
IMAGE_NAMES = {"subject.png": "person.png", "subject_mask.png": "person_mask.png",
               "man.png": "person.png", "man_mask.png": "person_mask.png",
               "dog.png": "cat.png", "dog_mask.png": "cat_mask.png",
               "subject_b.png": "cat.png", "subject_b_mask.png": "cat_mask.png",
               "left_region.png": "region_a.png", "right_region.png": "region_b.png",
               "photo.png": "photo.png", "photo_subject_region.png": "photo_subject_region.png", "pose.png": "pose.png",
               "picture.png": "person.png", "picture_mask.png": "person_mask.png"}
SAMPLERS = ("KSampler", "KSamplerAdvanced")
DATASET_NODE = "MoASaveTrainingExample"   # a dataset-building workflow: no sampler, its output is an example
# MOA_SCREENSHOTS=1: each workflow's look in the editor, small, in docs/ (the README shows them)
SCREENSHOT_DIR = ROOT / "docs" / "workflows"
SIZE, STEPS = 64, 2


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _ids(paths):
    return [p.stem for p in paths]


def test_there_are_example_workflows():
    names = {p.stem for p in WORKFLOWS}
    assert {"moa_single_subject", "moa_two_subjects", "moa_subject_swap", "moa_morph", "moa_two_subjects_regions",
            "moa_controlnet_pose", "moa_style_lora", "moa_build_dataset", "moa_sdxl_single_subject",
            "moa_sdxl_two_subjects_regions"} <= names, names


def _widget_inputs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of the inputs the editor shows as widgets, in the editor's order."""
    out = []
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 else {}
            if (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput"):
                out.append((name, spec))
    return out


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_workflow_file_matches_the_node_definitions(path: Path, server):
    """Valid UI-format JSON; every node type exists; links are whole; widget values fit /object_info."""
    wf = json.loads(path.read_text())
    object_info = server.request("/object_info")
    assert {"nodes", "links", "version"} <= set(wf), "not a UI-format workflow (app.graph.serialize())"
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    unknown = sorted({n["type"] for n in wf["nodes"]} - set(object_info) - FRONTEND_ONLY)
    assert not unknown, f"node types not in /object_info: {unknown}"
    types = {n["type"] for n in wf["nodes"]}
    assert {"MoAApply", "MoASubject", "MoAAdapterLoader", "MoARouterMaps"} <= types or {"MoASubject", DATASET_NODE} <= types

    links = {}
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        assert src in nodes and dst in nodes, f"link {link_id} joins missing nodes"
        assert nodes[src]["outputs"][src_slot]["type"] == kind, f"link {link_id}: output type is not {kind}"
        assert link_id in (nodes[src]["outputs"][src_slot]["links"] or [])
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        links[link_id] = (src, dst)
    assert wf["last_link_id"] >= max(links) and wf["last_node_id"] >= max(nodes)

    for n in wf["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        info = object_info[n["type"]]
        label = f"{n['type']} #{n['id']} ({n.get('title', '')})"
        linked = {i["name"] for i in n.get("inputs", []) if i.get("link") is not None}
        widgets = _widget_inputs(info)
        widget_names = {name for name, _ in widgets}
        for name in info["input"].get("required", {}):
            assert name in linked or name in widget_names, f"{label}: required input {name} is not connected"
        values = list(n.get("widgets_values") or [])
        for name, spec in widgets:
            assert values, f"{label}: no value for widget {name}"
            value = values.pop(0)
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, list) and name not in MODEL_NAMES and name != "image":   # file lists vary
                assert value in kind, f"{label}: {name}={value!r} is not one of {kind}"
            if kind in ("INT", "FLOAT"):
                assert opts.get("min", -np.inf) <= value <= opts.get("max", np.inf), f"{label}: {name}={value}"
            if opts.get("control_after_generate"):
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize"), label
        if any(len(s) > 1 and s[1].get("image_upload") for _, s in widgets):
            values.pop(0)                                       # the upload button's value
        assert not values, f"{label}: {len(values)} widget value(s) more than the node has: {values}"


def test_workflows_are_listed_as_templates(server):
    """ComfyUI serves a pack's workflows/ folder as templates (app/custom_node_manager.py)."""
    listed = server.request("/api/workflow_templates")
    assert sorted(listed.get(PACK_DIR_NAME, [])) == sorted(p.stem for p in WORKFLOWS), listed
    for path in WORKFLOWS:
        served = server.request(f"/api/workflow_templates/{PACK_DIR_NAME}/{path.name}")
        served = json.loads(served) if isinstance(served, bytes) else served
        assert served == json.loads(path.read_text()), f"{path.name} is served differently"


# ---------------------------------------------------------------------------------------------------------
# in the graph editor


@pytest.fixture(scope="module")
def editor(server, server_inputs, app_inputs, sdxl_server_inputs):
    """One headless Chromium on the server's graph editor for all workflows of this module."""
    missing = browser_missing()
    if missing:
        if _ci():
            pytest.fail(f"CI is set but the browser test cannot run: {missing}")
        pytest.skip(missing)
    driver = start_chromium()
    try:
        open_editor(driver, server.url)
        console_errors(driver)                  # drop what the page load itself printed
        yield driver
    finally:
        driver.quit()


LOAD_JS = r"""
const [text, name, done] = arguments;
(async () => {
  const wf = JSON.parse(text);
  await app.loadGraphData(wf, true, true, name);
  await new Promise(r => setTimeout(r, 300));     // let dialogs / toasts open if any would
  const reg = LiteGraph.registered_node_types;
  done(JSON.stringify({
    nodes: app.graph.nodes.length, links: Object.keys(app.graph.links).length,
    errors: app.graph.nodes.filter(n => n.has_errors).map(n => `${n.type} #${n.id}`),
    missing: app.graph.nodes.filter(n => !(n.type in reg)).map(n => n.type),
    dialogs: [...document.querySelectorAll('.p-dialog')].map(d => d.innerText.slice(0, 300)),
    toasts: [...document.querySelectorAll('.p-toast-message')].map(d => d.innerText.slice(0, 300)),
  }));
})().catch(e => done(JSON.stringify({exception: String(e && e.stack || e)})));
"""

PREPARE_JS = r"""
const [models, images, size, steps, done] = arguments;
(async () => {
  const changed = [], unknown = [];
  for (const n of app.graph.nodes) {
    for (const w of n.widgets || []) {
      const was = w.value;
      if (w.name in models) w.value = models[w.name];
      else if (w.name === 'image' && (n.type === 'LoadImage' || n.type === 'LoadImageMask')) {
        if (w.value in images) w.value = images[w.value]; else unknown.push(`${n.type} #${n.id}: ${w.value}`);
      }
      else if (w.name === 'steps') w.value = steps;
      else if (n.type === 'EmptyLatentImage' && (w.name === 'width' || w.name === 'height')) w.value = size;
      else continue;
      changed.push(`${n.type}.${w.name}: ${was} -> ${w.value}`);
    }
  }
  const p = await app.graphToPrompt();
  done(JSON.stringify({changed, unknown, output: p.output, workflow_nodes: p.workflow.nodes.length}));
})().catch(e => done(JSON.stringify({exception: String(e && e.stack || e)})));
"""


def _image(server, img: dict) -> np.ndarray:
    folder = {"output": "output", "temp": "temp", "input": "input"}[img["type"]]
    return np.asarray(Image.open(server.base / folder / img["subfolder"] / img["filename"]))


def _frames(prompt: dict) -> int:
    """Images per output: one, or one per factor of a morph sequence."""
    morphs = [n["inputs"] for n in prompt.values() if n["class_type"] == "MoASubjectMorph"]
    return morphs[0]["frames"] if morphs and morphs[0]["mode"] == "sequence" else 1


def _save_screenshot(driver, name: str) -> None:
    """The editor as the workflow opens, shrunk and palettised to stay small (< 150 KB)."""
    import io
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    driver.execute_script("document.querySelectorAll('.p-toast-message').forEach(e => e.remove())")
    shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    shot = shot.resize((shot.width * 2 // 3, shot.height * 2 // 3), Image.LANCZOS)
    shot.quantize(colors=96, method=Image.Quantize.MEDIANCUT).save(SCREENSHOT_DIR / f"{name}.png", optimize=True)


def _expected_size(prompt: dict, node_id: str) -> tuple[int, int]:
    """(height, width) of what an image output node receives: SIZE, or two SIZE pictures stitched."""
    src = prompt[prompt[node_id]["inputs"]["images"][0]]
    if src["class_type"] == "ImageStitch":
        gap = src["inputs"]["spacing_width"]
        return (SIZE, 2 * SIZE + gap) if src["inputs"]["direction"] in ("left", "right") else (2 * SIZE + gap, SIZE)
    return SIZE, SIZE


def _load(editor, path: Path) -> dict:
    """Open the workflow in the editor; checks it loaded whole, without dialogs or console errors."""
    wf_text = path.read_text()
    wf = json.loads(wf_text)
    loaded = json.loads(editor.execute_async_script(LOAD_JS, wf_text, path.name))
    assert "exception" not in loaded, loaded.get("exception")
    assert loaded["missing"] == [] and loaded["errors"] == [], loaded
    assert loaded["dialogs"] == [], f"the editor opened a dialog on load: {loaded['dialogs']}"
    assert (loaded["nodes"], loaded["links"]) == (len(wf["nodes"]), len(wf["links"])), loaded
    assert console_errors(editor) == []
    return wf


def _check_examples_saved(server, prompt: dict, entry: dict) -> None:
    """A dataset-building workflow appended its example to a dataset the trainer's validator accepts."""
    from comfyui_moa.moa_attention.training.dataset import read_manifest
    for node_id in (i for i, n in prompt.items() if n["class_type"] == DATASET_NODE):
        (example,) = entry["outputs"][node_id]["text"]
        assert (server.base / "output" / example).is_file(), example
        records, problems = read_manifest(server.base / "output" / example.split("/")[0])
        assert problems == [] and records, problems


#: workflow name -> the prompt the classic canvas built and the server ran (test_workflow_loads_in_the_editor_and_runs)
RAN: dict[str, dict] = {}


def _prepare(editor, path: Path) -> dict:
    """Swap in the tiny models (SDXL ones for an SDXL workflow) and images; the editor's own prompt."""
    models = SDXL_MODEL_NAMES if path.stem.startswith("moa_sdxl_") else MODEL_NAMES
    prepared = json.loads(editor.execute_async_script(PREPARE_JS, models, IMAGE_NAMES, SIZE, STEPS))
    assert "exception" not in prepared, prepared.get("exception")
    assert prepared["unknown"] == [], f"add these test images to IMAGE_NAMES: {prepared['unknown']}"
    return prepared["output"]


def _run(editor, server, prompt: dict) -> None:
    """Queue the editor's prompt, check every output's pictures."""
    kinds = [n["class_type"] for n in prompt.values()]
    assert not FRONTEND_ONLY & set(kinds), "frontend-only nodes must not reach the server"
    if DATASET_NODE in kinds:
        entry = server.run(prompt)
        assert entry["status"]["status_str"] == "success", f"execution failed: {execution_error(entry)}"
        _check_examples_saved(server, prompt, entry)
        assert console_errors(editor) == []
        return
    assert any(k in SAMPLERS for k in kinds) and all(
        n["inputs"]["steps"] == STEPS for n in prompt.values() if n["class_type"] in SAMPLERS + ("MoAInvertPhoto",))

    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", f"execution failed: {execution_error(entry)}"
    outputs = [i for i, n in prompt.items() if n["class_type"] in ("SaveImage", "PreviewImage", "SaveAnimatedPNG")]
    assert outputs, "a workflow must show its results"
    frames = _frames(prompt)
    for node_id in outputs:
        images = entry["outputs"].get(node_id, {}).get("images", [])
        expected = 1 if prompt[node_id]["class_type"] == "SaveAnimatedPNG" else frames
        assert len(images) == expected, f"{prompt[node_id]['class_type']} #{node_id} got {len(images)} image(s)"
        pic = _image(server, images[0])
        assert pic.shape[:2] == _expected_size(prompt, node_id), (node_id, pic.shape)
        if prompt[prompt[node_id]["inputs"]["images"][0]]["class_type"] == "ImageStitch":
            left, right = pic[:, :SIZE], pic[:, -SIZE:]
            assert not np.array_equal(left, right), "with and without MoA gave the same picture"
    assert console_errors(editor) == []


@pytest.mark.slow
@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_workflow_loads_in_the_editor_and_runs(path: Path, editor, server):
    _load(editor, path)
    if os.environ.get("MOA_SCREENSHOTS"):
        _save_screenshot(editor, path.stem)
    prompt = _prepare(editor, path)
    _run(editor, server, prompt)
    RAN[path.stem] = prompt


# ---------------------------------------------------------------------------------------------------------
# with the editor's new node renderer ("Nodes 2.0": DOM nodes instead of canvas drawing)

VUE_NODES_SETTING = "Comfy.VueNodes.Enabled"       # the pinned frontend's "Modern Node Design (Nodes 2.0)"
#: the workflow whose Nodes 2.0 look is kept in docs/workflows/ (MOA_SCREENSHOTS=1)
VUE_SCREENSHOT = "moa_single_subject"

SETTING_JS = r"""
const [id, value, done] = arguments;
app.extensionManager.setting.set(id, value).then(() => done(app.extensionManager.setting.get(id)),
                                                 e => done(`failed: ${e}`));
"""

VUE_DOM_JS = r"""
const [done] = arguments;
(async () => {
  for (let i = 0; i < 100 && !document.querySelector('.lg-node[data-node-id]'); i++)
    await new Promise(r => setTimeout(r, 100));
  const shown = {};
  for (const el of document.querySelectorAll('.lg-node[data-node-id]'))
    shown[el.dataset.nodeId] = {widgets: el.querySelectorAll('.lg-node-widget').length, text: el.innerText};
  done(JSON.stringify({
    shown,
    nodes: app.graph.nodes.filter(n => n.type.startsWith('MoA')).map(n => ({
      id: String(n.id), type: n.type, widgets: (n.widgets || []).map(w => w.name)})),
  }));
})().catch(e => done(JSON.stringify({exception: String(e && e.stack || e)})));
"""


@pytest.fixture(scope="module")
def vue_editor(server, server_inputs, app_inputs, sdxl_server_inputs):
    """A headless Chromium on the graph editor with Nodes 2.0 switched on (and off again afterwards: the
    setting is stored on the server, for every later page load)."""
    missing = browser_missing()
    if missing:
        if _ci():
            pytest.fail(f"CI is set but the browser test cannot run: {missing}")
        pytest.skip(missing)
    driver = start_chromium()
    try:
        open_editor(driver, server.url)
        assert driver.execute_async_script(SETTING_JS, VUE_NODES_SETTING, True) is True
        console_errors(driver)
        yield driver
    finally:
        try:
            driver.execute_async_script(SETTING_JS, VUE_NODES_SETTING, False)
        finally:
            driver.quit()


def _widget_tooltip_shown(editor, node_id: str, object_info: dict, node_type: str) -> None:
    """Hovering a MoA node's first widget shows its input's tooltip from /object_info."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from support.waits import wait_for
    editor.execute_script("app.canvas.centerOnNode(app.graph.getNodeById(Number(arguments[0]))); "
                          "app.canvas.setDirty(true, true)", node_id)
    selector = f'.lg-node[data-node-id="{node_id}"] .lg-node-widget'
    wait_for(lambda: editor.execute_script(
        "const r = document.querySelector(arguments[0]).getBoundingClientRect();"
        "return r.width > 0 && r.left >= 0 && r.top >= 0 && r.right <= innerWidth && r.bottom <= innerHeight",
        selector), f"{node_type} #{node_id} centred in the window", 1)
    widget = editor.find_element(By.CSS_SELECTOR, selector)
    name, spec = _widget_inputs(object_info[node_type])[0]
    ActionChains(editor).move_to_element(widget).perform()
    shown = wait_for(lambda: editor.execute_script(
        "return [...document.querySelectorAll('.p-tooltip')].map(t => t.innerText).join('\\n')"),
        f"the tooltip of {node_type}.{name}", 1)
    assert spec[1]["tooltip"].split(".")[0][:40] in shown, (name, shown)
    ActionChains(editor).move_to_element_with_offset(editor.find_element(By.TAG_NAME, "body"), 0, 0).perform()


@pytest.mark.slow
@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_workflow_loads_and_runs_with_nodes_2_0(path: Path, vue_editor, server):
    """Every MoA node is drawn as a Nodes 2.0 DOM node showing its widgets (a hovered one shows its tooltip),
    and the workflow runs from there as from the classic canvas: it builds the very prompt the classic
    canvas ran (run here only when the classic test did not run it)."""
    _load(vue_editor, path)
    dom = json.loads(vue_editor.execute_async_script(VUE_DOM_JS))
    assert "exception" not in dom, dom.get("exception")
    object_info = server.request("/object_info")
    for node in dom["nodes"]:
        el = dom["shown"].get(node["id"])
        assert el is not None, f"{node['type']} #{node['id']} is not drawn as a Nodes 2.0 node"
        # an upload button, and a seed's control_after_generate (drawn inside its number widget), are no rows
        rows = [w for w in node["widgets"] if w not in ("upload", "control_after_generate")]
        assert el["widgets"] >= len(rows) > 0 or not node["widgets"], (node, el["widgets"])
    if os.environ.get("MOA_SCREENSHOTS") and path.stem == VUE_SCREENSHOT:
        _save_screenshot(vue_editor, f"{path.stem}_nodes_2_0")
    first = next(n for n in dom["nodes"] if n["widgets"])
    _widget_tooltip_shown(vue_editor, first["id"], object_info, first["type"])
    prompt = _prepare(vue_editor, path)
    if path.stem in RAN:
        assert prompt == RAN[path.stem], "Nodes 2.0 builds another prompt than the classic canvas"
        assert console_errors(vue_editor) == []
    else:
        _run(vue_editor, server, prompt)
