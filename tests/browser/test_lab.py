"""The notebooks as a learner meets them: JupyterLab in headless Chromium, Run → Run All Cells,
then what must be on the screen: every figure, the live plots (one image redrawn in place), the
sliders rendered and driving their plot, tqdm's progress bar, and no error anywhere.

Run with `make test-browser` (see conftest.py for the server and the browser).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from .harness import REPORT, VENV_BIN, our_processes

RUN_TIMEOUT = float(os.environ.get("DEQLITE_BROWSER_RUN_TIMEOUT", "900"))   # s per notebook
NB02 = "02_fixed_point_solvers.ipynb"
NB04 = "04_training_a_deq.ipynb"
# the notebooks with a widget or a live plot, beside 02 and 04 (which have tests of their own)
OTHERS = ["01_weight_tied_input_injected.ipynb", "05_jacobian_regularization.ipynb",
          "06_conv_and_multiscale_deq.ipynb", "07_deq_transformer_lm.ipynb",
          "08_joint_inference_input_optimization.ipynb",
          "10_scaling_up.ipynb"]
# a cell that makes a live figure (redrawn in place while it runs), or follows a run's log
LIVE = r"LiveResidualPlot\(|TrainingDashboard\(|RunComparison\(|follow\("

# Every distinct picture and progress-bar width each cell's outputs show, as they appear: a live
# figure is redrawn in place, so one <img> whose src changes (or is swapped) shows up here as
# several frames while the cell runs.
RECORDER = """() => {
  const frames = window.__deqliteFrames = {}, bars = window.__deqliteBars = {};
  const cellOf = (node) => node.closest && node.closest('.jp-Cell');
  const note = (table, cell, value) => {
    const key = cell.dataset.windowedListIndex;
    const seen = table[key] = table[key] || [];
    if (!seen.includes(value)) seen.push(value);
  };
  const look = (node) => {
    if (!(node instanceof Element)) return;
    const cell = cellOf(node);
    if (!cell) return;
    const imgs = node.tagName === 'IMG' ? [node] : node.querySelectorAll('img');
    for (const img of imgs)
      if (img.src.startsWith('data:image/png')) note(frames, cell, img.src.length + ':' + img.src.slice(-64));
    const barEls = node.classList.contains('progress-bar') ? [node] : node.querySelectorAll('.progress-bar');
    for (const bar of barEls) note(bars, cell, bar.style.width || bar.style.height);
  };
  new MutationObserver((records) => {
    for (const r of records) {
      if (r.type === 'attributes') look(r.target);
      else r.addedNodes.forEach(look);
    }
  }).observe(document.body, {subtree: true, childList: true, attributes: true,
                             attributeFilter: ['src', 'style']});
}"""

STATUS = """() => {
  const prompts = Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt'))
                       .map(p => p.textContent.trim());
  const indicator = document.querySelector('.jp-Notebook-ExecutionIndicator');
  return {running: prompts.filter(p => p.includes('*')).length,
          executed: prompts.filter(p => /\\[\\d+\\]/.test(p)).length,
          code_cells: prompts.length,
          indicator: indicator ? indicator.dataset.status : null};
}"""

PROBLEMS = """() => {
  const out = [];
  for (const o of document.querySelectorAll('.jp-Notebook .jp-OutputArea-output')) {
    const text = o.textContent;
    const cell = o.closest('.jp-Cell').dataset.windowedListIndex;
    const mime = o.dataset.mimeType || '';
    if ((mime === 'application/vnd.jupyter.stderr' && /Traceback|Error|Exception/.test(text)) ||
        /Error displaying widget|Model not found|Loading widget\\.\\.\\./.test(text))
      out.push(`cell ${cell} (${mime}): ${text.slice(0, 400)}`);
  }
  return out;
}"""


def notebook_cells(lab, name):
    return json.loads((lab.root / name).read_text())["cells"]


def code_cell(cells, marker: str) -> int:
    """Index of the code cell whose source contains `marker`."""
    hits = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and marker in "".join(c["source"])]
    assert len(hits) == 1, f"{marker!r} is in code cells {hits}: expected exactly one"
    return hits[0]


def cell(page, index: int):
    return page.locator(f'.jp-Notebook .jp-Cell[data-windowed-list-index="{index}"]')


def png_images(page, index: int) -> list[dict]:
    """The PNG images a cell's outputs show: their decoded width and a short signature."""
    return cell(page, index).evaluate("""(c) => Array.from(c.querySelectorAll('.jp-OutputArea img'))
        .filter(i => i.src.startsWith('data:image/png'))
        .map(i => ({width: i.naturalWidth, sig: i.src.length + ':' + i.src.slice(-64)}))""")


def open_notebook(page, lab, name: str) -> None:
    """Open the notebook and wait until the status bar says its kernel is idle."""
    page.goto(f"{lab.url}/lab/tree/{name}?reset")        # ?reset: no tabs left from other tests
    page.locator(".jp-Notebook").first.wait_for(state="visible", timeout=120_000)
    status_bar = page.locator(".jp-StatusBar-TextItem", has_text="Python 3 (ipykernel)").first
    deadline = time.monotonic() + 120
    while True:
        # a kernel choice dialog would mean the notebook's kernelspec (python3) was not found
        dialog = page.locator(".jp-Dialog")
        assert not dialog.count(), f"{name}: a dialog on opening: {dialog.first.inner_text()!r}"
        if status_bar.count() and status_bar.inner_text().endswith("| Idle"):
            break
        assert time.monotonic() < deadline, f"{name}: the kernel is not idle 120 s after opening: " + \
            (status_bar.inner_text() if status_bar.count() else "no kernel in the status bar")
        page.wait_for_timeout(500)
    assert page.locator(".jp-Notebook").count() == 1, "more than one notebook open"


def check_kernel_is_ours(lab, name: str) -> None:
    """The notebook's kernel is the venv's python, in fast mode (it inherits DEQLITE_FAST=1)."""
    kernel_id = next(s["kernel"]["id"] for s in lab.api("/api/sessions") if s["path"] == name)
    pids = [pid for pid, cmd in our_processes(lab.tmp).items() if f"kernel-{kernel_id}" in cmd]
    assert len(pids) == 1, f"expected one process for kernel {kernel_id}, found {pids}"
    with open(f"/proc/{pids[0]}/cmdline", "rb") as f:
        executable = f.read().split(b"\0")[0].decode()
    assert Path(executable).parent == VENV_BIN, f"the kernel runs {executable}, not {VENV_BIN}/python"
    with open(f"/proc/{pids[0]}/environ", "rb") as f:
        assert b"DEQLITE_FAST=1" in f.read().split(b"\0"), "the kernel is not in fast mode"


def menu(page, top: str, item: str) -> None:
    """Click a menu of the menu bar, then one of its items, as a learner does."""
    page.locator(".lm-MenuBar-item", has_text=re.compile(f"^{top}$")).click()
    label = page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{item}$"))
    page.locator(".lm-Menu .lm-Menu-item", has=label).click()


def run_all_cells(page, lab, name: str) -> float:
    """Run → Run All Cells, then wait until every code cell has run and the kernel is idle."""
    page.evaluate(RECORDER)
    menu(page, "Run", "Run All Cells")
    start = time.monotonic()
    quiet = 0                                 # consecutive polls with nothing running
    while True:
        page.wait_for_timeout(1000)
        status = page.evaluate(STATUS)
        sessions = lab.api("/api/sessions")
        idle = status["running"] == 0 and status["indicator"] == "idle" and all(
            s["kernel"]["execution_state"] == "idle" for s in sessions)
        quiet = quiet + 1 if idle and status["executed"] > 0 else 0
        # all cells numbered: done; some not numbered (a cell failed, the rest was cancelled):
        # done too once nothing has moved for a while
        if quiet >= 3 and (status["executed"] == status["code_cells"] or quiet >= 10):
            break
        elapsed = time.monotonic() - start
        assert elapsed < RUN_TIMEOUT, f"{name}: still running after {elapsed:.0f} s: {status}"
    seconds = time.monotonic() - start
    assert status["executed"] == status["code_cells"] == sum(
        c["cell_type"] == "code" for c in notebook_cells(lab, name)), \
        f"{name}: not every code cell ran: {status}\n" + "\n".join(page.evaluate(PROBLEMS))
    return seconds


def check_no_errors(page, name: str) -> None:
    problems = page.evaluate(PROBLEMS)
    assert not problems, f"{name} shows errors:\n" + "\n".join(problems)


def stderr_shown(page) -> list[str]:
    """Text on stderr that the notebook shows (a red box: a learner must see none)."""
    return page.evaluate("""() => Array.from(document.querySelectorAll(
        '.jp-Notebook .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
        .map(o => `cell ${o.closest('.jp-Cell').dataset.windowedListIndex}: ${o.textContent.trim().slice(0, 300)}`)""")


def screenshot(page, locator, path: Path) -> None:
    """Screenshot of one element. Off-screen cells have an estimated height until they are
    scrolled to (JupyterLab's default windowing, content-visibility), so scroll there first and
    let the layout settle before measuring."""
    for _ in range(2):
        locator.scroll_into_view_if_needed()
        page.wait_for_timeout(400)
    locator.screenshot(path=str(path))


def outside_definitions(source: str) -> str:
    """The cell's code without the bodies of the functions and classes it defines (a cell that
    only defines a drawing function draws nothing)."""
    kept, inside = [], False
    for line in source.splitlines():
        if re.match(r"(async\s+)?(def|class)\s", line):
            inside = True
        elif inside and line.strip() and not line[0].isspace() and not line.startswith("@"):
            inside = False
        if not inside:
            kept.append(line)
    return "\n".join(kept)


def check_every_figure(page, cells, name: str) -> int:
    """Every cell that draws (plt.show, a live plot, follow) shows a decoded PNG image."""
    drawing = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and re.search(
        LIVE + r"|plt\.show\(\)|interact\(", outside_definitions("".join(c["source"])))]
    missing = [i for i in drawing if not any(img["width"] > 200 for img in png_images(page, i))]
    assert not missing, f"{name}: cells {missing} show no figure"
    return len(drawing)


def frames(page, index: int) -> list[str]:
    return page.evaluate(f"() => window.__deqliteFrames['{index}'] || []")


def save_and_check_file(page, lab, name: str) -> None:
    """File → Save Notebook; the saved file has every code cell numbered and no error output."""
    before = (lab.root / name).stat().st_mtime_ns
    menu(page, "File", "Save Notebook")
    deadline = time.monotonic() + 60
    while (lab.root / name).stat().st_mtime_ns == before:
        assert time.monotonic() < deadline, f"{name} was not saved"
        page.wait_for_timeout(250)
    page.wait_for_timeout(500)
    code = [c for c in notebook_cells(lab, name) if c["cell_type"] == "code"]
    assert all(c["execution_count"] for c in code)
    errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"
              or (o.get("name") == "stderr" and "Traceback" in "".join(o.get("text", "")))]
    assert not errors, f"{name}: saved error outputs {errors}"


def wait_for_new_image(page, index: int, old_sig: str, what: str) -> str:
    deadline = time.monotonic() + 120
    while True:
        sigs = [img["sig"] for img in png_images(page, index) if img["width"] > 200]
        if sigs and sigs[0] != old_sig:
            return sigs[0]
        assert time.monotonic() < deadline, f"{what}: the plot did not change"
        page.wait_for_timeout(250)


def run_and_check_live_figure(page, lab, artifacts, name, cells, index, what):
    """Open notebook `name`, run all its cells and check what every run must show (our kernel,
    no error, a picture in every cell that draws); then cell `index` must hold ONE image that was
    redrawn in place while the cell ran. Returns (seconds, figure cells, frames seen)."""
    open_notebook(page, lab, name)
    check_kernel_is_ours(lab, name)
    seconds = run_all_cells(page, lab, name)
    page.screenshot(path=str(artifacts / f"{name[:2]}-after-run-all.png"))
    check_no_errors(page, name)
    n_figures = check_every_figure(page, cells, name)
    images = png_images(page, index)
    assert len(images) == 1, f"{what} should be one image, found {len(images)}"
    shown = frames(page, index)
    assert len(shown) >= 2 and shown[-1] == images[0]["sig"], \
        f"{what} was not redrawn in place: {len(shown)} frame(s) seen"
    return seconds, n_figures, shown


def test_02_solvers_live_plot_and_sliders(page, lab, artifacts):
    cells = notebook_cells(lab, NB02)
    live, explore = code_cell(cells, "plot = LiveResidualPlot("), code_cell(cells, "widgets.interact(")
    # the live residual plot: one image, redrawn in place while the three solvers ran
    seconds, n_figures, shown = run_and_check_live_figure(page, lab, artifacts, NB02, cells, live,
                                                          "the live residual plot")
    screenshot(page, cell(page, live), artifacts / "02-live-residual-plot.png")

    # the explorer: two dropdowns, two sliders and a plot, and moving a slider redraws the plot
    ui = cell(page, explore)
    ui.scroll_into_view_if_needed()
    assert ui.locator(".widget-interact").count() == 1, "widgets.interact did not render"
    assert ui.locator(".widget-dropdown select").count() == 2
    sliders = ui.locator(".widget-slider")
    assert sliders.count() == 2, f"expected the sliders m and damping, found {sliders.count()}"
    m_slider = sliders.filter(has=page.locator(".widget-label", has_text=re.compile(r"^m$")))
    damping = sliders.filter(has=page.locator(".widget-label", has_text="damping"))
    assert m_slider.locator(".widget-readout").text_content().strip() == "5"
    plot = png_images(page, explore)
    assert len(plot) == 1, f"the explorer should show one plot, found {len(plot)}"
    screenshot(page, ui, artifacts / "02-sliders-before.png")

    # keyboard: focus m's handle, one step right
    m_slider.locator(".noUi-handle").focus()
    page.keyboard.press("ArrowRight")
    sig = wait_for_new_image(page, explore, plot[0]["sig"], "m 5 → 6 (keyboard)")
    assert m_slider.locator(".widget-readout").text_content().strip() == "6"

    # mouse: drag damping's handle from 1.0 to about halfway along its track
    damping.scroll_into_view_if_needed()
    track = damping.locator(".noUi-target").bounding_box()
    handle = damping.locator(".noUi-handle").bounding_box()
    page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
    page.mouse.down()
    page.mouse.move(track["x"] + track["width"] / 2, handle["y"] + handle["height"] / 2, steps=10)
    page.mouse.up()
    wait_for_new_image(page, explore, sig, "damping 1.0 → ~0.55 (mouse)")
    value = float(damping.locator(".widget-readout").text_content())
    assert 0.3 < value < 0.8, f"damping readout {value} after dragging to the middle"
    page.wait_for_timeout(500)
    screenshot(page, ui, artifacts / "02-sliders-after.png")
    check_no_errors(page, NB02)
    save_and_check_file(page, lab, NB02)
    REPORT.append(f"{NB02}: Run All {seconds:.0f} s; {n_figures} figure cells; live plot "
                  f"{len(shown)} frames; sliders m 5→6 (keyboard), damping 1.0→{value} (drag) redrew")
    shown_on_stderr = stderr_shown(page)
    assert not shown_on_stderr, f"{NB02} shows on stderr:\n" + "\n".join(shown_on_stderr)


def test_04_training_dashboard_and_progress_bar(page, lab, artifacts):
    cells = notebook_cells(lab, NB04)
    training = code_cell(cells, "dash = TrainingDashboard(")
    # the dashboard: one image, redrawn in place while training
    seconds, n_figures, shown = run_and_check_live_figure(page, lab, artifacts, NB04, cells,
                                                          training, "the dashboard")

    # tqdm's progress bar (an ipywidgets HBox: description, bar, counts): on screen while the
    # run went (its first state was drawn before the last) and full at the end
    out = cell(page, training)
    out.scroll_into_view_if_needed()
    bar = out.locator(".widget-hprogress")
    assert bar.count() == 1, f"expected one progress bar in the training cell, found {bar.count()}"
    text = out.locator(".widget-hbox").first.text_content()
    counts = re.search(r"(\d+)/(\d+)", text)
    assert "100%" in text and counts and counts[1] == counts[2], f"progress bar text {text!r}"
    assert bar.locator(".progress-bar").evaluate("b => b.style.width") == "100%"
    widths = page.evaluate(f"() => window.__deqliteBars['{training}'] || []")
    assert len(widths) >= 2 and "100%" in widths, f"the bar was not drawn during the run: {widths}"
    partial = [w for w in widths if w.endswith("%") and 0 < float(w[:-1]) < 100]
    screenshot(page, out.locator(".jp-Cell-outputWrapper"), artifacts / "04-dashboard-and-progress.png")
    save_and_check_file(page, lab, NB04)
    REPORT.append(f"{NB04}: Run All {seconds:.0f} s; {n_figures} figure cells; dashboard "
                  f"{len(shown)} frames; progress bar {text.split()[0]} {counts[0]}, "
                  f"{len(partial)} partial widths seen")
    shown_on_stderr = stderr_shown(page)
    assert not shown_on_stderr, f"{NB04} shows on stderr:\n" + "\n".join(shown_on_stderr)


def move_every_slider(page, name: str) -> list[str]:
    """Every slider of the notebook, one step to the right by keyboard: each must redraw the
    picture of its cell. Returns what moved, for the report."""
    moved = []
    sliders = page.locator(".jp-Notebook .widget-slider")
    for k in range(sliders.count()):
        slider = sliders.nth(k)
        slider.scroll_into_view_if_needed()
        index = int(slider.evaluate("s => s.closest('.jp-Cell').dataset.windowedListIndex"))
        label = slider.locator(".widget-label").text_content().strip() or f"slider {k}"
        before = [img["sig"] for img in png_images(page, index) if img["width"] > 200]
        assert before, f"{name}: the slider {label!r} has no picture beside it (cell {index})"
        readout = slider.locator(".widget-readout").text_content().strip()
        slider.locator(".noUi-handle").focus()
        page.keyboard.press("ArrowRight")
        wait_for_new_image(page, index, before[0], f"{name}: slider {label!r} moved")
        after = slider.locator(".widget-readout").text_content().strip()
        assert after != readout, f"{name}: the slider {label!r} did not move ({readout})"
        moved.append(f"{label} {readout}→{after}")
    return moved


@pytest.mark.parametrize("name", OTHERS, ids=lambda n: n[:2])
def test_every_live_plot_redraws_and_every_slider_drives_its_plot(page, lab, artifacts, name):
    """Run All: no error, a picture in every cell that draws, every live figure one image redrawn
    in place (at least two frames, the last the one shown), every slider moves its plot."""
    cells = notebook_cells(lab, name)
    live = [i for i, c in enumerate(cells) if c["cell_type"] == "code"
            and re.search(LIVE, "".join(c["source"]))]
    widgets = [i for i, c in enumerate(cells) if c["cell_type"] == "code"
               and "interact(" in "".join(c["source"])]
    assert live or widgets, f"{name} has neither a live plot nor a widget: take it off the list"
    open_notebook(page, lab, name)
    check_kernel_is_ours(lab, name)
    seconds = run_all_cells(page, lab, name)
    page.screenshot(path=str(artifacts / f"{name[:2]}-after-run-all.png"))
    check_no_errors(page, name)
    n_figures = check_every_figure(page, cells, name)
    redrawn = {}
    for i in live:
        shown, images = frames(page, i), png_images(page, i)
        assert images, f"{name}: the live figure of cell {i} shows no image"
        assert len(shown) >= 2 and shown[-1] in [img["sig"] for img in images], \
            f"{name}: the live figure of cell {i} was not redrawn in place ({len(shown)} frame(s))"
        redrawn[i] = len(shown)
    moved = move_every_slider(page, name)
    assert len(moved) >= len(widgets), f"{name}: {len(widgets)} interact cells, {len(moved)} sliders"
    check_no_errors(page, name)
    shown_on_stderr = stderr_shown(page)
    assert not shown_on_stderr, f"{name} shows on stderr:\n" + "\n".join(shown_on_stderr)
    REPORT.append(f"{name}: Run All {seconds:.0f} s; {n_figures} figure cells; live figures "
                  f"(cell: frames) {redrawn or 'none'}; sliders moved: {', '.join(moved) or 'none'}")
