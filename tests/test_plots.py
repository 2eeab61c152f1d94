"""Live and static residual plots (checked under Agg)."""
import pytest
from conftest import symmetric_tanh_problem

from deqlite import solve
from deqlite.plots import LiveResidualPlot, plot_residuals


def test_live_residual_plot_gets_one_point_per_evaluation():
    f, z0 = symmetric_tanh_problem(d=16, batch=4)
    plot = LiveResidualPlot(["forward_iteration", "anderson"], tol=1e-6, min_interval=0.0)
    nfe = {}
    for name in plot.lines:
        _, stats = solve(f, z0, solver=name, tol=1e-6, max_iter=500, callback=plot.callback(name))
        nfe[name] = stats.nfe
        assert list(plot.lines[name].get_ydata()) == pytest.approx(
            stats.rel_residuals.max(dim=1).values.tolist())
    plot.close()
    for name, line in plot.lines.items():
        assert len(line.get_xdata()) == nfe[name]
    assert plot.ax.get_yscale() == "log"
    assert "residual" in plot.ax.get_ylabel() and "NFE" in plot.ax.get_xlabel()
    labels = [t.get_text() for t in plot.ax.get_legend().get_texts()]
    assert labels == ["tol = 1e-06", "forward_iteration", "anderson"]
    with pytest.raises(KeyError, match="broyden"):
        plot.callback("broyden")


def test_static_plot_has_a_line_per_solve_and_per_sample_lines():
    f, z0 = symmetric_tanh_problem(d=16, batch=3)
    stats = {n: solve(f, z0, solver=n, tol=1e-6, max_iter=500)[1] for n in ("anderson", "broyden")}
    ax = plot_residuals(stats, per_sample=True)
    # per solve: 1 max line + 3 sample lines; plus the tolerance line
    assert len(ax.get_lines()) == 2 * (1 + 3) + 1
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(t.startswith("anderson (") and "NFE" in t for t in legend)


def test_live_plot_in_a_notebook_replaces_one_png_output(monkeypatch):
    import IPython.display

    from deqlite import plots

    shown = []

    class Handle:
        def update(self, obj):
            shown.append(("update", obj))

    def fake_display(obj, display_id=False):
        shown.append(("display", obj))
        return Handle()

    monkeypatch.setattr(plots, "_in_notebook", lambda: True)
    monkeypatch.setattr(IPython.display, "display", fake_display)
    f, z0 = symmetric_tanh_problem(d=16, batch=2)
    plot = LiveResidualPlot(["anderson"], min_interval=3600)   # throttled: no redraw mid-solve
    solve(f, z0, solver="anderson", tol=1e-8, max_iter=200, callback=plot.callback("anderson"))
    plot.close()
    kinds = [k for k, _ in shown]
    assert kinds[0] == "display" and kinds.count("display") == 1      # one output, never a pile
    assert kinds.count("update") == 1                                  # throttled; final frame forced
    assert shown[-1][1].data[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_display_as_pictures_in_a_notebook_without_pyplot(monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell
    from matplotlib.figure import Figure
    from deqlite import plots
    shell = InteractiveShell.instance()
    monkeypatch.setattr(plots, "_in_notebook", lambda: True)
    png = shell.display_formatter.formatters["image/png"]
    png.type_printers.pop(Figure, None)
    monkeypatch.setattr("IPython.get_ipython", lambda: shell)
    plots.ensure_figure_display()
    fig = Figure()
    fig.add_subplot().plot([0, 1])
    data, _ = shell.display_formatter.format(fig)
    assert data["image/png"][:4] == b"\x89PNG"


def test_a_live_plots_first_frame_draws_without_a_warning_for_the_learner():
    """The empty residual plot (a log axis whose only y value is the `tol` line) used to print
    matplotlib's 'identical low and high ylims' warning in the learner's notebook."""
    import warnings
    from deqlite.plots import LiveResidualPlot, _figure_png
    plot = LiveResidualPlot(["anderson"], tol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _figure_png(plot.fig).startswith(b"\x89PNG")
