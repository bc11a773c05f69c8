"""The course in a real browser: JupyterLab, started here on a free 127.0.0.1 port over a temporary
copy of notebooks/ and exercises/, driven by Playwright on Debian's Chromium (`make test` installs
both; Playwright's own browser download is not used).

* every chapter runs top to bottom (Run All) without an error output or a traceback, and the page
  shows no "Error displaying widget";
* every lab a chapter displays answers its main control in the page: the view changes; a refused value
  leaves the control showing the value in effect, with the lab's message visible (`LABS`);
* every exercise's check prints FAIL on the learner copy and PASS (no FAIL) on the solution.

A failure keeps a screenshot, the page's HTML, the browser console and the server's log in
test-artifacts/browser/ (git-ignored). Chromium is found at $MINIVLLM_CHROMIUM, else /usr/bin/chromium;
without it (or Playwright, or JupyterLab) the module is skipped with the command that installs it, except
under CI (CI set), where that is a failure."""
from __future__ import annotations

import inspect
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = os.environ.get("MINIVLLM_CHROMIUM", "/usr/bin/chromium")
CHAPTERS = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9]*.ipynb"))
EXERCISES = sorted(p.name for p in (ROOT / "exercises" / "solutions").glob("[0-9]*.ipynb"))
# per notebook: Run All (or an exercise's cells) must end within this; the slowest chapter takes ~90 s here
RUN_TIMEOUT_S = float(os.environ.get("MINIVLLM_BROWSER_RUN_TIMEOUT", "300"))
LAB_TIMEOUT_MS = 90_000  # one control's effect: some labs re-run a simulation or the course model
SERVER_START_S = 90
TRACEBACK = "Traceback (most recent call last)"
WIDGET_ERROR = "Error displaying widget"

pytestmark = pytest.mark.browser


def _missing() -> str | None:
    """What this machine lacks for the browser test, with the command that installs it."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return 'Playwright is not installed: pip install -c constraints.txt -e ".[test,course]" (make test does)'
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        return 'JupyterLab is not installed: pip install -c constraints.txt -e ".[test,course]" (make test does)'
    if not os.access(CHROMIUM, os.X_OK):
        return (f"no Chromium at {CHROMIUM}: apt-get install -y chromium (make test does it when run as root), "
                "or point MINIVLLM_CHROMIUM at a Chromium")
    return None


if (_why := _missing()) is not None:
    if os.environ.get("CI"):
        raise RuntimeError(f"the browser test cannot run in CI: {_why}")
    pytest.skip(_why, allow_module_level=True)

from playwright.sync_api import Page, sync_playwright  # noqa: E402


# ---- the server ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# JupyterLab settings for the test's server: every cell in the page (no windowing, so outputs and widgets
# of cells out of view exist too), no autosave, no news or update checks
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}


@dataclass
class Server:
    url: str
    token: str
    log: Path
    proc: subprocess.Popen = field(repr=False)

    def api(self, path: str, method: str = "GET"):
        req = urllib.request.Request(f"{self.url}/api/{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """JupyterLab on a free 127.0.0.1 port, rooted at a temporary copy of notebooks/ and exercises/."""
    tmp = tmp_path_factory.mktemp("browser")
    root = tmp / "course"
    root.mkdir()
    ignore = shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__")
    for folder in ("notebooks", "exercises"):
        shutil.copytree(ROOT / folder, root / folder, ignore=ignore)
    for name, values in LAB_SETTINGS.items():
        path = tmp / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    for d in ("config", "data", "runtime", "ipython", "workspaces"):
        (tmp / d).mkdir()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_DATA_DIR=str(tmp / "data"),
               JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), IPYTHONDIR=str(tmp / "ipython"),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    port, token = free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True", f"--LabApp.user_settings_dir={tmp / 'settings'}",
           f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = tmp / "jupyter-server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", token, log, proc)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                srv.api("status")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"jupyter lab did not answer within {SERVER_START_S} s:\n"
                                       f"{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ---- the browser --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab_page(server):
    """One Chromium page on JupyterLab for the whole module; each test opens its notebook in it."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.console_lines = []
            page.on("console", lambda m: page.console_lines.append(f"{m.type}: {m.text}"))
            page.goto(f"{server.url}/lab?reset&token={server.token}")
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.started", timeout=120_000)
            page.evaluate("async () => { await window.jupyterapp.restored; }")
            yield page
        finally:
            browser.close()


@contextmanager
def artifacts_on_failure(page: Page, server: Server, name: str):
    """On a failure, keep the page (screenshot, HTML), the console and the server log under ARTIFACTS."""
    stem = re.sub(r"[^\w.-]+", "_", name)
    for old in ARTIFACTS.glob(f"{stem}.*"):
        old.unlink()
    page.console_lines.clear()
    try:
        yield
    except BaseException as e:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        kept = []
        for suffix, save in ((".png", lambda p: page.screenshot(path=p, full_page=True)),
                             (".html", lambda p: Path(p).write_text(page.content())),
                             (".console.txt", lambda p: Path(p).write_text("\n".join(page.console_lines))),
                             (".server.log", lambda p: shutil.copyfile(server.log, p))):
            try:
                save(str(ARTIFACTS / f"{stem}{suffix}"))
                kept.append(f"{stem}{suffix}")
            except Exception as err:  # a broken page must not hide the failure itself
                kept.append(f"{stem}{suffix} (not saved: {err})")
        if hasattr(e, "add_note"):
            e.add_note(f"browser artifacts in {ARTIFACTS}: {', '.join(kept)}")
        raise


# ---- notebooks in the page ----------------------------------------------------------------------------
OPEN_JS = """async (path) => {
    const app = window.jupyterapp;
    const w = await app.commands.execute('docmanager:open', {path, factory: 'Notebook'});
    await w.context.ready;
    await w.sessionContext.ready;
    app.shell.activateById(w.id);
    window.__mv = {nb: w, run: null};
    return w.id;
}"""

KERNEL_IDLE_JS = """() => {
    const k = window.__mv.nb.sessionContext.session?.kernel;
    return !!k && k.status === 'idle';
}"""

# Run All as the menu does (notebook:run-all-cells); the promise settles when every cell has run, or
# the first error stopped the rest
RUN_ALL_JS = """() => {
    const app = window.jupyterapp, w = window.__mv.nb;
    app.shell.activateById(w.id);
    window.__mv.run = {done: false};
    app.commands.execute('notebook:run-all-cells').then(
        ok => { window.__mv.run = {done: true, ok}; },
        e => { window.__mv.run = {done: true, ok: false, error: String(e)}; });
}"""

# The given code cells one at a time (notebook:run-cell on each), as a learner does: an error in one
# does not cancel the next
RUN_CELLS_JS = """(indices) => {
    const app = window.jupyterapp, w = window.__mv.nb;
    app.shell.activateById(w.id);
    window.__mv.run = {done: false};
    (async () => {
        for (const i of indices) {
            w.content.activeCellIndex = i;
            w.content.deselectAll();
            await app.commands.execute('notebook:run-cell');
        }
    })().then(() => { window.__mv.run = {done: true, ok: true}; },
              e => { window.__mv.run = {done: true, ok: false, error: String(e)}; });
}"""

CELLS_JS = """() => window.__mv.nb.content.widgets.map((cell, i) => ({
    index: i, type: cell.model.type, source: cell.model.sharedModel.getSource(),
    count: cell.model.type === 'code' ? cell.model.executionCount : null,
    outputs: cell.model.type === 'code' ? cell.model.outputs.toJSON() : []}))"""

CLOSE_JS = """async () => {
    const w = window.__mv?.nb;
    if (!w || w.isDisposed) return;
    try { await w.sessionContext.shutdown(); } finally { w.dispose(); }
}"""


def output_text(output: dict) -> str:
    if output.get("output_type") == "stream":
        text = output.get("text", "")
    elif output.get("output_type") == "error":
        text = "\n".join([output.get("ename", ""), output.get("evalue", ""), *output.get("traceback", [])])
    else:
        data = output.get("data", {})
        text = "\n".join(v if isinstance(v, str) else "".join(v) if isinstance(v, list) else json.dumps(v)
                         for k, v in data.items() if not k.startswith("image/"))
    return "".join(text) if isinstance(text, list) else text


def cell_text(cell: dict) -> str:
    return "\n".join(output_text(o) for o in cell["outputs"])


class Notebook:
    """The notebook open in the page: run it, read its cells."""

    def __init__(self, page: Page, server: Server, path: str):
        self.page, self.server, self.path = page, server, path
        page.evaluate(OPEN_JS, path)
        page.wait_for_function(KERNEL_IDLE_JS, timeout=120_000)
        self.panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)").last

    def _wait_run(self, what: str) -> None:
        start = time.monotonic()
        try:
            self.page.wait_for_function("() => window.__mv.run && window.__mv.run.done",
                                        timeout=RUN_TIMEOUT_S * 1000, polling=500)
        except Exception as e:
            raise AssertionError(f"{self.path}: {what} did not end within {RUN_TIMEOUT_S:.0f} s") from e
        self.page.wait_for_function(KERNEL_IDLE_JS, timeout=60_000)
        run = self.page.evaluate("() => window.__mv.run")
        assert "error" not in run, f"{self.path}: {what} failed in the page: {run['error']}"
        self.seconds = time.monotonic() - start

    def run_all(self) -> None:
        self.page.evaluate(RUN_ALL_JS)
        self._wait_run("Run All")

    def run_cells(self, indices: list[int]) -> None:
        self.page.evaluate(RUN_CELLS_JS, indices)
        self._wait_run(f"running cells {indices}")

    def cells(self) -> list[dict]:
        return self.page.evaluate(CELLS_JS)

    def settle(self) -> None:
        """Wait until the widget outputs are drawn (their views are created after the outputs arrive)."""
        self.page.wait_for_function(
            """() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output')]
                     .filter(o => o.getAttribute('data-mime-type') === 'application/vnd.jupyter.widget-view+json')
                     .every(o => o.children.length > 0 || o.textContent.trim().length > 0)""",
            timeout=60_000)
        self.page.wait_for_timeout(500)

    def assert_clean(self, indices: list[int] | None = None) -> None:
        """No error output, no traceback in any output, every code cell run, no widget error in the page."""
        for cell in self.cells():
            if cell["type"] != "code" or not cell["source"].strip() or (indices and cell["index"] not in indices):
                continue
            where = f"{self.path} cell {cell['index']}"
            assert cell["count"] is not None, f"{where} did not run: {cell['source'][:200]!r}"
            for out in cell["outputs"]:
                assert out.get("output_type") != "error", (
                    f"{where} raised {out.get('ename')}: {out.get('evalue')}\n{cell['source'][:300]}")
                assert TRACEBACK not in output_text(out), f"{where} shows a traceback:\n{output_text(out)[-2000:]}"
        text = self.panel.text_content()
        assert WIDGET_ERROR not in text, f"{self.path}: the page shows {WIDGET_ERROR!r}: " + \
            text[text.index(WIDGET_ERROR):][:300]

    def close(self) -> None:
        self.page.evaluate(CLOSE_JS)


@pytest.fixture
def open_notebook(lab_page, server, request):
    """``open_notebook(path)`` -> a `Notebook`, closed (kernel shut down) after the test. A test runs
    inside ``with open_notebook.keeping_artifacts():`` to keep the page under test-artifacts/browser/
    if it fails."""
    opened = []

    def open_(path: str) -> Notebook:
        nb = Notebook(lab_page, server, path)
        opened.append(nb)
        return nb

    open_.keeping_artifacts = lambda: artifacts_on_failure(lab_page, server, request.node.name)
    yield open_
    for nb in opened:
        nb.close()
    for session in server.api("sessions"):  # anything left behind by a test that failed half-way
        server.api(f"sessions/{session['id']}", method="DELETE")


# ---- the labs: what a learner does with each one's main control, and one refused value ---------------
@dataclass(frozen=True)
class Act:
    """One user action on a control, found by its description (a button by its text).

    kind: "select" (a dropdown: the first of ``values`` that is not the current option, or the next option
    when ``values`` is empty), "fill" (a text or number box: the first of ``values`` not shown; Enter),
    "slide" (a slider: one step from where it is, or to ``values[0]``: "Home" or "End"), "toggle" (a
    checkbox), "click" (a button), "pick" (toggle buttons: the first option not active), "select-all"
    (a multiple selection: every option)."""

    kind: str
    label: str
    values: tuple = ()


@dataclass(frozen=True)
class LabSpec:
    change: tuple[Act, ...]  # must change the view
    refuse: tuple[Act, ...] = ()  # the last act is refused: the message shows, the control keeps its value
    why: str = ""  # what the refusal is
    watch: Act | None = None  # the control that must show the value in effect (default: the refused act's)
    read_at: int = -1  # ... as it showed just before this act of `refuse`


LABS = {
    "KVMemoryLab": LabSpec((Act("select", "GPU"),), (Act("fill", "batch", ("0",)),), "a batch of 0"),
    "EngineStepperLab": LabSpec((Act("click", "add request"),),
                                (Act("fill", "prompt", ("x = 1 " * 150,)), Act("click", "add request")),
                                "a prompt longer than max_model_len (the prompt box goes back)",
                                watch=Act("fill", "prompt"), read_at=0),
    "LiveCinemaLab": LabSpec((Act("click", "add request"),),
                             (Act("slide", "prompt_len", ("Home",)), Act("slide", "shared_prefix", ("End",)),
                              Act("click", "add request")),
                             "a shared prefix longer than the prompt (the sliders go back)",
                             watch=Act("slide", "shared_prefix"), read_at=0),
    "CinemaLab": LabSpec((Act("slide", "frame"),), (Act("slide", "frame", ("End",)), Act("click", "step")),
                         "step past the last frame", watch=Act("slide", "frame")),
    "BatchingLab": LabSpec((Act("select", "workload"),), (Act("select", "model", ("Llama-3.1-70B",)),),
                           "a model whose weights do not fit the GPU"),
    "ChunkingLab": LabSpec((Act("slide", "token budget"),),
                           (Act("slide", "token budget", ("Home",)), Act("toggle", "chunked prefill")),
                           "chunked prefill off with a budget below max_model_len"),
    "AttentionRooflineLab": LabSpec((Act("select", "head size"),), (Act("fill", "context", ("0",)),),
                                    "a context of 0"),
    "SpecDecodeLab": LabSpec((Act("slide", "k"),), (Act("fill", "prompt", ("",)),), "an empty prompt"),
    "ParallelLab": LabSpec((Act("fill", "context", ("4096", "2048")),), (Act("fill", "TP", ("3",)),),
                           "TP=3 (the heads do not split three ways)"),
    "TuningLab": LabSpec((Act("select", "GPU", ("H200", "H100-SXM")),), (Act("fill", "TP", ("3",)),),
                         "TP=3 (the heads do not split three ways)"),
    "DisaggLab": LabSpec((Act("select", "KV link"),), (Act("fill", "prefill TP", ("3",)),),
                         "prefill TP=3 (the heads do not split three ways)"),
    "ServingLab": LabSpec((Act("fill", "prompts", ("12", "24")),), (Act("fill", "req/s", ("0",)),),
                          "a request rate of 0"),
    "LandscapeLab": LabSpec((Act("pick", "rows"),), (Act("select-all", "needs"),),
                            "needs that no engine meets"),
    # a quiz refuses nothing: the first question's choices are tried until the verdict changes
    "SelfCheck": LabSpec((Act("radio", ""),)),
}


class LabInPage:
    """One lab's widget in the page (found by the CSS classes `minivllm.lab.Lab` gives it)."""

    def __init__(self, page: Page, root):
        self.page, self.root = page, root
        self.name = next(c.removeprefix("minivllm-lab-") for c in root.get_attribute("class").split()
                         if c.startswith("minivllm-lab-"))
        self.view = root.locator(".minivllm-lab-view").first
        self.message = root.locator(".minivllm-lab-message").first

    def control(self, act: Act):
        if act.kind == "click":
            return self.root.locator(f'button.widget-button:text-is("{act.label}")').first
        if act.kind == "radio":
            return self.root.locator(".widget-radio-box").first.locator("input")
        if act.kind == "toggle":
            return self.root.locator(".widget-checkbox", has_text=act.label).locator("input").first
        # a described control: the widget whose own label (not a child's) is the description, or the
        # description and a note ("token budget (max_num_batched_tokens)")
        pattern = "^" + re.escape(act.label) + r"(\s|\(|$)"
        box = self.root.locator(f'.lm-Widget:has(> label.widget-label:text-matches({json.dumps(pattern)}))').first
        return {"select": box.locator("select"), "select-all": box.locator("select"),
                "fill": box.locator("input, textarea"), "slide": box.locator(".noUi-handle"),
                "pick": box.locator("button")}[act.kind]

    def shown(self, act: Act):
        """What the control shows now."""
        c = self.control(act)
        if act.kind in ("select", "select-all"):
            return c.first.evaluate("s => [...s.selectedOptions].map(o => o.textContent)")
        if act.kind == "fill":
            return c.first.input_value()
        if act.kind == "slide":
            return c.first.get_attribute("aria-valuenow")
        if act.kind == "toggle":
            return c.is_checked()
        if act.kind == "pick":
            return c.evaluate_all("bs => bs.filter(b => b.classList.contains('mod-active')).map(b => b.textContent)")
        return None

    def do(self, act: Act):
        """Perform ``act``; returns the value it asked for (for the message of a failed check)."""
        c = self.control(act)
        c.first.scroll_into_view_if_needed()
        if act.kind == "click":
            c.click()
            return act.label
        if act.kind == "toggle":
            c.click()
            return not self.shown(act)
        if act.kind == "select":
            s = c.first
            options = s.evaluate("s => [...s.options].map(o => o.textContent)")
            current = s.evaluate("s => s.selectedIndex")
            want = next((v for v in act.values if v in options and options.index(v) != current),
                        None if act.values else options[(current + 1) % len(options)])
            assert want is not None, f"{self.name}: none of {act.values} is another option of {act.label!r}"
            s.select_option(label=want)
            return want
        if act.kind == "select-all":
            n = c.first.evaluate("s => s.options.length")
            c.first.select_option(index=list(range(n)))
            return "every option"
        if act.kind == "fill":
            box = c.first
            want = next((v for v in act.values if v != box.input_value()), None)
            assert want is not None, f"{self.name}: {act.label!r} already shows {act.values}"
            box.fill(want)
            box.press("Tab" if box.evaluate("e => e.tagName") == "TEXTAREA" else "Enter")
            return want
        if act.kind == "slide":
            handle = c.first
            now, lo = (float(handle.get_attribute(a)) for a in ("aria-valuenow", "aria-valuemin"))
            key = act.values[0] if act.values else ("ArrowRight" if now == lo else "ArrowLeft")
            handle.focus()
            handle.press(key)
            return key
        if act.kind == "pick":
            other = c.evaluate_all("bs => bs.findIndex(b => !b.classList.contains('mod-active'))")
            c.nth(other).click()
            return c.nth(other).text_content()
        raise ValueError(act.kind)

    def view_html(self) -> str:
        return self.view.inner_html()

    def wait_view_change(self, before: str, what: str) -> None:
        try:
            self.view.evaluate("(v, before) => new Promise((ok, no) => { const t0 = Date.now();"
                               " const poll = () => v.innerHTML !== before ? ok() :"
                               f" Date.now() - t0 > {LAB_TIMEOUT_MS} ? no('unchanged') : setTimeout(poll, 200);"
                               " poll(); })", before)
        except Exception as e:
            raise AssertionError(f"{self.name}: {what} left the view unchanged after {LAB_TIMEOUT_MS / 1000:.0f} s"
                                 f" (message: {self.message.inner_text()!r})") from e

    def answer_until_the_view_changes(self, act: Act) -> list[str]:
        """A quiz's radio buttons: click the first question's other choices in turn until the view changes
        (from one wrong answer to another, it need not)."""
        before, tried = self.view_html(), []
        radios = self.control(act)
        for i in range(radios.count()):
            if radios.nth(i).is_checked():
                continue
            radios.nth(i).scroll_into_view_if_needed()
            radios.nth(i).click()
            tried.append(radios.nth(i).evaluate("r => r.parentElement.textContent"))
            try:
                self.view.evaluate("(v, before) => new Promise((ok, no) => { const t0 = Date.now(); const poll ="
                                   " () => v.innerHTML !== before ? ok() : Date.now() - t0 > 5000 ? no() :"
                                   " setTimeout(poll, 100); poll(); })", before)
                return tried
            except Exception:
                continue
        raise AssertionError(f"{self.name}: answering {tried} left the view unchanged")

    def check(self, spec: LabSpec) -> None:
        before = self.view_html()
        if spec.change[0].kind == "radio":
            asked = self.answer_until_the_view_changes(spec.change[0])
        else:
            asked = [self.do(act) for act in spec.change]
            self.wait_view_change(before, f"setting {', '.join(map(str, asked))} ({spec.change})")
        print(f"{self.name}: {', '.join(map(str, asked))} changed the view")
        error = self.message.locator(".minivllm-lab-error")
        assert error.count() == 0 or not error.first.is_visible(), (
            f"{self.name}: {spec.change} was refused: {self.message.inner_text()!r}")
        if not spec.refuse:
            return
        refused, watch = spec.refuse[-1], spec.watch or spec.refuse[-1]
        read_at = spec.read_at % len(spec.refuse)
        for i, act in enumerate(spec.refuse):
            if i == read_at:
                shown_before = self.shown(watch)
            asked = self.do(act)
            if i < len(spec.refuse) - 1:
                self.page.wait_for_timeout(500)
        try:
            error.first.wait_for(state="visible", timeout=LAB_TIMEOUT_MS)
        except Exception as e:
            raise AssertionError(f"{self.name}: {spec.why} ({refused}: {asked!r}) showed no message; the control "
                                 f"shows {self.shown(refused)!r}") from e
        # the control goes back to the value in effect (the kernel answers after the message)
        deadline = time.monotonic() + 15
        while self.shown(watch) != shown_before and time.monotonic() < deadline:
            self.page.wait_for_timeout(200)
        assert self.shown(watch) == shown_before, (
            f"{self.name}: after the refused {refused.label}={asked!r} ({spec.why}) {watch.label!r} shows "
            f"{self.shown(watch)!r}, not the value in effect {shown_before!r}")
        print(f"{self.name}: {refused.label}={str(asked)[:40]!r} refused ({spec.why}); {watch.label!r} shows "
              f"{str(shown_before)[:40]!r}; message: {self.message.inner_text()[:200]!r}")


# ---- the tests ----------------------------------------------------------------------------------------
def test_every_lab_has_a_browser_check():
    import importlib
    import pkgutil

    import minivllm.lab
    from minivllm.lab.base import Lab

    for module in pkgutil.iter_modules(minivllm.lab.__path__):
        importlib.import_module(f"minivllm.lab.{module.name}")

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    # An abstract base (SettingsLab) is never shown on its own; its concrete labs are checked.
    labs = {c.__name__ for c in subclasses(Lab)
            if c.__module__.startswith("minivllm.lab.") and not inspect.isabstract(c)}
    assert labs, "no lab found in minivllm/lab"
    assert not labs - LABS.keys(), f"labs without a browser check in LABS: {sorted(labs - LABS.keys())}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.split("_")[0] for c in CHAPTERS])
def test_chapter_runs_and_its_labs_answer(open_notebook, lab_page, chapter):
    with open_notebook.keeping_artifacts():
        nb = open_notebook(f"notebooks/{chapter}")
        nb.run_all()
        print(f"{chapter}: Run All {nb.seconds:.1f} s")
        nb.settle()
        nb.assert_clean()
        labs = [LabInPage(lab_page, root) for root in nb.panel.locator(".minivllm-lab").all()]
        committed = json.loads((ROOT / "notebooks" / chapter).read_text())
        displays_a_lab = any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
                             for c in committed["cells"] for o in c.get("outputs", ()))
        if displays_a_lab:
            assert labs, f"{chapter} displays a widget, but no lab is drawn in the page"
        start = time.monotonic()
        for lab in labs:
            assert lab.name in LABS, f"{chapter}: {lab.name} has no browser check in LABS"
            lab.check(LABS[lab.name])
        print(f"{chapter}: {len(labs)} lab(s) checked in {time.monotonic() - start:.1f} s")
        nb.assert_clean()  # nothing the controls did broke a widget or printed a trace


@pytest.mark.parametrize("exercise", EXERCISES, ids=[e.split("_")[0] for e in EXERCISES])
def test_exercise_check_fails_on_the_skeleton_and_passes_on_the_solution(open_notebook, exercise):
    with open_notebook.keeping_artifacts():
        sol = open_notebook(f"exercises/solutions/{exercise}")
        sol.run_all()
        sol.assert_clean()
        cells = sol.cells()
        checks = [c["index"] for c in cells if re.search(r"^(PASS|FAIL)\b", cell_text(c), re.M)]
        assert checks, f"solutions/{exercise}: no cell printed a check's PASS or FAIL"
        for i in checks:
            assert "PASS" in cell_text(cells[i]) and not re.search(r"^FAIL\b", cell_text(cells[i]), re.M), \
                f"solutions/{exercise} cell {i}: the check does not pass:\n{cell_text(cells[i])[-2000:]}"
        sol.close()

        learner = open_notebook(f"exercises/{exercise}")
        code = [c["index"] for c in learner.cells() if c["type"] == "code" and c["source"].strip()]
        learner.run_cells([i for i in code if i <= max(checks)])  # a learner's run up to the check, cell by cell
        lcells = learner.cells()
        for i in checks:
            text = cell_text(lcells[i])
            assert re.search(r"^FAIL\b", text, re.M) and "PASS" not in text, \
                f"exercises/{exercise} cell {i}: the check does not print FAIL on the skeleton:\n{text[-2000:]}"
        assert WIDGET_ERROR not in learner.panel.text_content()
        print(f"{exercise}: solution {sol.seconds:.1f} s, learner copy {learner.seconds:.1f} s")
