"""Kedro-Viz: the static site of ``kedro viz build``, opened in a real headless Chromium.

The site is built in a temporary copy of the project (``kedro viz build`` always writes
``./build``), served on 127.0.0.1 by ``python -m http.server`` on a free port, and read
through Selenium. Set ``IMSVD_VIZ_SCREENSHOT=docs/pipeline.png`` to save the pipeline view.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import copy_project

pytestmark = [pytest.mark.slow, pytest.mark.browser]

BIN = Path(sys.executable).parent
PIPELINES = ["validate", "augment", "pretrain", "evaluate"]
NODES = [
    "load_and_check_images",
    "accept_validated_images",
    "build_view_cache",
    "pretrain_encoder",
    "embed_images",
    "compute_metrics",
    "draw_pictures",
]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1300,1300",
    "--force-device-scale-factor=1.5",  # a screenshot whose labels stay readable
]
# Kedro-Viz reads its UI state from localStorage: the whole __default__ pipeline, light
# theme, no onboarding hints, no sidebar or minimap over the graph.
VIEW_STATE = {
    "pipeline": {"active": "__default__"},
    "expandAllPipelines": True,
    "theme": "light",
    "showFeatureHints": False,
    "orientation": "vertical",
    "visible": {
        "sidebar": False,
        "miniMap": False,
        "code": False,
        "graph": True,
        "slicing": True,
        "traceback": False,
    },
}


def _browser_paths() -> tuple[str, str]:
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip(
            "needs Debian's chromium and chromium-driver "
            "(apt-get install chromium chromium-driver); "
            f"found chromium={chromium}, chromedriver={driver}"
        )
    return chromium, driver


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The static Kedro-Viz site of the project."""
    _browser_paths()  # skip before the build when no browser can read the site
    project = copy_project(tmp_path_factory.mktemp("viz") / "project")
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        ["kedro", "viz", "build"], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    build = project / "build"
    assert (build / "index.html").is_file() and (build / "api" / "main").is_file()
    return build


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def url(site: Path) -> Iterator[str]:
    """The site served on 127.0.0.1 by a background ``python -m http.server``."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(site)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, "http.server exited"
                assert time.monotonic() < deadline, "http.server did not start"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = _browser_paths()
    options = Options()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def as_identifier(label: str) -> str:
    """A displayed label back to a node name: Kedro-Viz may prettify ``embed_images``."""
    return "_".join(label.strip().lower().split())


def graph_labels(driver: Any) -> set[str]:
    return {as_identifier(e.text) for e in driver.find_elements("css selector", "svg text") if e.text}


def open_default_pipeline(driver: Any, url: str, **visible: bool) -> None:
    """Open the site on the whole ``__default__`` pipeline, in the view of ``VIEW_STATE``.

    The app writes its own state once loaded, so ours is merged in after that and the
    page reloaded.
    """
    from selenium.webdriver.support.ui import WebDriverWait

    state = {**VIEW_STATE, "visible": {**VIEW_STATE["visible"], **visible}}
    driver.get(url)
    WebDriverWait(driver, 60).until(lambda d: set(NODES) <= graph_labels(d))
    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return localStorage.getItem('KedroViz')"))
    driver.execute_script(
        "const saved = JSON.parse(localStorage.getItem('KedroViz') || '{}');"
        "localStorage.setItem('KedroViz', JSON.stringify({...saved, ...arguments[0]}));",
        state,
    )
    driver.refresh()
    WebDriverWait(driver, 60).until(lambda d: set(NODES) <= graph_labels(d))
    WebDriverWait(driver, 20).until(lambda d: d.find_elements("css selector", ".kui-theme--light"))


def test_static_site_lists_the_four_pipelines(site: Path) -> None:
    main = json.loads((site / "api" / "main").read_text())
    assert {p["id"] for p in main["pipelines"]} == {*PIPELINES, "__default__"}
    assert main["selected_pipeline"] == "__default__"
    for name in PIPELINES:
        assert (site / "api" / "pipelines" / name).is_file()


def test_browser_shows_the_nodes_of_all_four_pipelines(browser: Any, url: str) -> None:
    open_default_pipeline(browser, url)
    assert browser.title == "Kedro-Viz"
    assert set(NODES) <= graph_labels(browser)
    if target := os.environ.get("IMSVD_VIZ_SCREENSHOT"):
        time.sleep(2)  # let the layout's transition finish
        assert browser.save_screenshot(str(Path(target).resolve()))


def test_browser_pipeline_menu_offers_each_pipeline(browser: Any, url: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    open_default_pipeline(browser, url, sidebar=True)
    menu = WebDriverWait(browser, 60).until(
        lambda d: next((e for e in d.find_elements("css selector", ".dropdown__label") if e.text), None)
    )
    assert menu.text.strip() == "__default__"
    menu.click()
    WebDriverWait(browser, 20).until(
        lambda d: set(PIPELINES) <= {e.text.strip() for e in d.find_elements("css selector", ".dropdown *")}
    )
