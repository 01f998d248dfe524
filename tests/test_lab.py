"""`make lab` opens JupyterLab, as root and as an ordinary user, on a machine without a display; and the workbook
works in a real browser (headless Chromium driven by Playwright).

Each test starts the real server the way a learner does (``make lab``), on a free port with a known token, then
talks to it: the REST API lists the notebooks, a kernel starts, runs code and is shut down. The browser test opens
notebook 01 in JupyterLab, runs it to the playground and moves a slider; the screenshot goes to
``tests/artifacts/`` (git-ignored). Where no Chromium can be had, the browser test skips and says why.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A JupyterLab server started by ``make lab`` (optionally as another user), and its REST API."""

    def __init__(self, home: Path, user: str | None = None, extra: str = ""):
        self.port, self.token = _free_port(), uuid.uuid4().hex
        self.url = f"http://127.0.0.1:{self.port}"
        home.mkdir(parents=True, exist_ok=True)
        # this server's user settings: no autosave (the notebooks in the checkout stay as they are), no news pop-up
        settings = home / ".jupyter" / "lab" / "user-settings" / "@jupyterlab"
        for plugin, value in (("docmanager-extension/plugin", {"autosave": False}),
                              ("apputils-extension/notification", {"fetchNews": "false"})):
            (settings / plugin).parent.mkdir(parents=True, exist_ok=True)
            (settings / f"{plugin}.jupyterlab-settings").write_text(json.dumps(value))
        environ = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
        environ.update(HOME=str(home), JUPYTER_RUNTIME_DIR=str(home / "runtime"), MPLCONFIGDIR=str(home / "mpl"),
                       PYTHONPATH=os.environ.get("PYTHONPATH", str(REPO)))
        # the interpreter running the tests first on PATH, so that set-up finds everything installed
        environ["PATH"] = f"{Path(sys.executable).parent}:{environ.get('PATH', '')}"
        cmd = ["make", "-s", "-C", str(REPO), "lab",
               f"LAB_ARGS=--port={self.port} --ServerApp.ip=127.0.0.1 --IdentityProvider.token={self.token} {extra}"]
        if user:
            os.chmod(home, 0o777)
            cmd = ["runuser", "-u", user, "--", "env", *[f"{k}={v}" for k, v in environ.items()], *cmd]
        self.log = home / "lab.log"
        self.proc = subprocess.Popen(cmd, env=environ, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 180
        while True:
            try:
                self.get("/api/status")
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"`make lab` did not serve (exit {self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
                time.sleep(0.5)

    def request(self, method: str, path: str, body: dict | None = None):
        req = urllib.request.Request(self.url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            data = r.read()
            return json.loads(data) if data else None

    def get(self, path: str):
        return self.request("GET", path)

    def run_code(self, kernel_id: str, code: str, timeout: float = 120) -> str:
        """Execute ``code`` in the kernel over its websocket; return what it printed (fail on an error)."""
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        async def go():
            ws = await websocket_connect(HTTPRequest(f"ws://127.0.0.1:{self.port}/api/kernels/{kernel_id}/channels",
                                                     headers={"Authorization": f"token {self.token}"}))
            msg_id = uuid.uuid4().hex
            ws.write_message(json.dumps({
                "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex,
                           "msg_type": "execute_request", "version": "5.3"},
                "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
                "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                            "allow_stdin": False, "stop_on_error": True}}))
            out, status = [], None
            while status is None or status != "idle":
                raw = await asyncio.wait_for(ws.read_message(), timeout)
                if raw is None:
                    raise AssertionError("the kernel's websocket closed")
                msg = json.loads(raw)
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind = msg["msg_type"]
                if kind == "stream":
                    out.append(msg["content"]["text"])
                elif kind == "error":
                    raise AssertionError("\n".join(msg["content"]["traceback"]))
                elif kind == "status":
                    status = msg["content"]["execution_state"]
            ws.close()
            return "".join(out)

        return asyncio.run(go())

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # Ctrl-C, twice: jupyter asks once
            time.sleep(0.3)
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def _check_lab(lab: Lab, uid: int):
    names = {item["name"] for item in lab.get("/api/contents")["content"]}
    expected = {p.name for p in (REPO / "notebooks").glob("*.ipynb")}
    assert expected and expected <= names, (expected, names)
    kernel = lab.request("POST", "/api/kernels", {"name": "python3"})
    try:
        out = lab.run_code(kernel["id"], "import os, labkit\nprint(os.getuid(), labkit.__file__)")
        got_uid, path = out.split()
        assert int(got_uid) == uid and path.startswith(str(REPO)), out
        assert lab.run_code(kernel["id"], "print(6 * 7)").strip() == "42"
    finally:
        lab.request("DELETE", f"/api/kernels/{kernel['id']}")
    assert kernel["id"] not in {k["id"] for k in lab.get("/api/kernels")}
    log = lab.log.read_text()
    assert "--no-browser" in log  # no DISPLAY: the URL is printed instead of opening a browser


def _setup_missing() -> str | None:
    """What set-up would still install for this interpreter (``make lab`` would then need a package index)."""
    check = subprocess.run(["bash", str(REPO / "scripts" / "bootstrap.sh"), "--check", sys.executable],
                           capture_output=True, text=True)
    return None if check.returncode == 0 else (check.stderr.strip().splitlines() or ["incomplete"])[-1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    missing = _setup_missing()
    if missing:  # e.g. a GPU runner with only the packages it measures with: set-up would need the network
        pytest.skip(f"this interpreter lacks part of the workbook's environment ({missing}); `make lab` would install it")
    # the browser test drives JupyterLab's own commands (window.jupyterapp), which this option exposes
    server = Lab(tmp_path_factory.mktemp("lab-home"), extra="--LabApp.expose_app_in_browser=True")
    yield server
    server.stop()


def test_make_lab_opens_as_this_user(lab):
    _check_lab(lab, os.getuid())
    if os.getuid() == 0:
        assert "--allow-root" in lab.log.read_text()


def _other_user_skip_reason(user: str = "nobody") -> str | None:
    if os.getuid() != 0 or shutil.which("runuser") is None:
        return "starting the server as another user needs root and runuser"
    probe = subprocess.run(["runuser", "-u", user, "--", sys.executable, "-c", "import jupyterlab"],
                           capture_output=True, text=True, env={**os.environ, "HOME": "/tmp"})
    if probe.returncode != 0:
        return f"user {user} cannot run {sys.executable} here ({probe.stderr.strip()[-120:]})"
    return None


@pytest.mark.skipif(_other_user_skip_reason() is not None, reason=str(_other_user_skip_reason()))
def test_make_lab_opens_as_an_ordinary_user():
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="labkit-lab-"))  # pytest's tmp_path sits in a folder only root may enter
    os.chmod(base, 0o755)
    server = Lab(base / "home", user="nobody")
    try:
        _check_lab(server, int(subprocess.check_output(["id", "-u", "nobody"])))
        assert "--allow-root" not in server.log.read_text()
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("uid, display, flags", [
    ("0", "", ["--allow-root", "--no-browser"]),
    ("1000", "", ["--no-browser"]),
    ("0", ":0", ["--allow-root"]),
    ("1000", ":0", []),
])
def test_make_lab_flags(uid, display, flags):
    """The options `make lab` passes for root / an ordinary user, with and without a display (dry run)."""
    environ = {**os.environ, "DISPLAY": display}
    environ.pop("WAYLAND_DISPLAY", None)
    out = subprocess.run(["make", "-n", "-s", "-C", str(REPO), "lab", f"LAB_UID={uid}"], capture_output=True,
                         text=True, env=environ, timeout=60).stdout
    line = next(ln for ln in out.splitlines() if "-m jupyter lab" in ln)
    got = [f for f in ("--allow-root", "--no-browser") if f in line.split("-m jupyter lab", 1)[1]]
    assert got == flags, line


# ---------------------------------------------------------------------------------------------- browser
def _browser_skip_reason() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"no {CHROMIUM} (install Debian's chromium: apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    return None


@pytest.mark.skipif(_browser_skip_reason() is not None, reason=str(_browser_skip_reason()))
def test_notebook_01_playground_in_a_browser(lab):
    """JupyterLab in headless Chromium: open 01, run to the playground, move a slider, the output follows."""
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    nb = "01_quantization_basics.ipynb"
    stored = (REPO / "notebooks" / nb).read_bytes()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{lab.url}/lab/tree/{nb}?token={lab.token}", timeout=90_000)
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget && "
                                   "window.jupyterapp.shell.currentWidget.sessionContext && "
                                   "window.jupyterapp.shell.currentWidget.sessionContext.session && "
                                   "window.jupyterapp.shell.currentWidget.content.widgets.length > 0", timeout=90_000)
            sources = page.evaluate("() => window.jupyterapp.shell.currentWidget.content.widgets.map("
                                    "c => [c.model.type, c.model.sharedModel.getSource(), c.model.metadata.tags || []])")
            # the playground needs the parameters cell, the cell that loads the model and picks the weight W,
            # and its own cell: run those (the whole notebook takes minutes on a CPU)
            playground = next(i for i, (t, src, _) in enumerate(sources) if t == "code" and "widgets.playground(" in src)
            needed = [i for i, (t, src, tags) in enumerate(sources) if t == "code" and i < playground
                      and ("parameters" in tags or "\nW = " in "\n" + src)] + [playground]
            assert len(needed) >= 3, needed
            for i in needed:
                page.evaluate("""async (i) => {
                    const panel = window.jupyterapp.shell.currentWidget;
                    panel.content.activeCellIndex = i;
                    panel.content.mode = 'command';
                    await window.jupyterapp.commands.execute('notebook:run-cell');
                }""", i)
            cell = page.locator(".jp-Notebook .jp-Cell").nth(playground)
            cell.scroll_into_view_if_needed()
            slider = cell.locator(".widget-slider .noUi-handle, .widget-slider .slider-container").first
            slider.wait_for(timeout=180_000)
            labels = cell.locator(".widget-label")
            assert {"bits", "group", "scheme"} <= set(labels.all_inner_texts()), labels.all_inner_texts()
            image = cell.locator(".widget-output img").last
            image.wait_for(timeout=60_000)
            before_img, before_text = image.get_attribute("src"), cell.locator(".widget-output").last.inner_text()
            handle = cell.locator(".widget-slider .noUi-handle").first
            handle.focus()
            for _ in range(2):
                handle.press("ArrowRight")  # bits 4 -> 6
            expect(cell.locator(".widget-readout").first).to_have_text("6", timeout=30_000)
            expect(cell.locator(".widget-output").last).to_contain_text("'bits_per_weight': 6.1", timeout=90_000)
            page.wait_for_function("""([sel, src]) => { const imgs = document.querySelectorAll(sel);
                return imgs.length && imgs[imgs.length - 1].getAttribute('src') !== src; }""",
                                   arg=[".jp-Cell.jp-mod-active .widget-output img, .widget-output img", before_img],
                                   timeout=60_000)
            after_text = cell.locator(".widget-output").last.inner_text()
            assert "bits" not in before_text or after_text != before_text, (before_text, after_text)
            page.screenshot(path=str(ARTIFACTS / "notebook01_playground.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "notebook01_failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert (REPO / "notebooks" / nb).read_bytes() == stored  # nothing was saved into the checkout
