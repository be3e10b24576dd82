"""The real ComfyUI graph editor in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium).

Selenium is given the driver and browser paths, so it never tries to download anything."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from .waits import minutes, wait_for

CHROMEDRIVER = Path("/usr/bin/chromedriver")             # Debian's chromium-driver (what dev.sh setup installs)
CHROMIUM_CANDIDATES = (Path("/usr/lib/chromium/chromium"), Path("/usr/bin/chromium"))
OTHER_BROWSERS = ("chromium", "chromium-browser", "google-chrome")

# Console errors that every page load prints on an offline machine and that mean nothing for us.
HARMLESS_CONSOLE = ("Cannot read properties of undefined (reading 'id')",   # frontend 1.32.9, every load
                    "Failed to load resource",                              # user.css, favicon, userdata 404s
                    "net::ERR_",                                            # registry site unreachable
                    "api.comfy.org")                                        # registry look-ups blocked offline


def chromium_binary() -> Path | None:
    found = next((p for p in CHROMIUM_CANDIDATES if p.is_file()), None)
    if found is None:
        found = next((Path(w) for w in map(shutil.which, OTHER_BROWSERS) if w), None)
    return found


def chromedriver() -> Path | None:
    if CHROMEDRIVER.is_file():
        return CHROMEDRIVER
    w = shutil.which("chromedriver")
    return Path(w) if w else None


def browser_missing() -> str | None:
    """Why the browser cannot start here, or None."""
    if chromedriver() is None or chromium_binary() is None:
        return "chromium/chromium-driver not installed (bash scripts/dev.sh setup installs them)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (bash scripts/dev.sh setup installs it)"
    return None


def start_chromium(width: int = 1600, height: int = 1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="moa-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(chromium_binary())
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                f"--window-size={width},{height}", f"--user-data-dir={profile}", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-quic",
                # loopback only: the editor's look-ups of the Comfy registry never leave the machine
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(chromedriver())), options=opts)
    driver.set_script_timeout(minutes(5))
    quit_ = driver.quit

    def quit_and_clean():
        try:
            quit_()
        finally:
            shutil.rmtree(profile, ignore_errors=True)
    driver.quit = quit_and_clean
    return driver


def open_editor(driver, url: str, budget_minutes: float = 5, node_type: str = "MoAApply") -> float:
    """Open the graph editor and wait until the app and `node_type` are registered; returns seconds taken."""
    t0 = time.time()
    driver.get(url + "/")
    wait_for(lambda: driver.execute_script("return !!(window.app && app.graph && app.canvas && window.LiteGraph && "
                                           "LiteGraph.registered_node_types[arguments[0]])", node_type),
             f"graph editor at {url} with the {node_type} node type", budget_minutes)
    return time.time() - t0


def console_errors(driver) -> list[str]:
    """SEVERE console entries since the last call, minus the known harmless ones."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not any(h in e["message"] for h in HARMLESS_CONSOLE)]
