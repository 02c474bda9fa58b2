"""``Report.plot`` reads at a glance for a ResNet-50-sized model: one horizontal, full-size label per
layer, none overlapping another or cut off, on a figure that is shown at page width without shrinking."""
from __future__ import annotations

import itertools
import warnings

import pytest

from structprune import Report


def _report(n_layers: int) -> Report:
    # ResNet-style names: block layers, downsample convs and their norms
    names = [f"layer{1 + i // 16}.{(i // 4) % 4}.{['conv1', 'bn1', 'conv2', 'downsample.0'][i % 4]}"
             for i in range(n_layers)]
    return Report(params=(1000, 500), macs=(None, None), latency_ms=(None, None),
                  layers=[(name, 64 * (1 + i % 8), 32 * (1 + i % 8)) for i, name in enumerate(names)])


def _plotted(report: Report, tmp_path, monkeypatch):
    """The figure ``report.plot`` saves, and the renderer that drew it."""
    matplotlib = pytest.importorskip("matplotlib", reason="Report.plot draws with matplotlib (in the test extra)")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    saved = []
    savefig = Figure.savefig

    def capture(self, *args, **kwargs):
        result = savefig(self, *args, **kwargs)
        self.canvas.draw()  # lay out and measure at one dpi (savefig's own may differ from the figure's)
        saved.append((self, self.canvas.get_renderer()))  # before plot() closes the figure
        return result

    monkeypatch.setattr(Figure, "savefig", capture)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layout or tick warnings either
        report.plot(str(tmp_path / "widths.png"))
    assert (tmp_path / "widths.png").stat().st_size > 0
    (drawn,) = saved
    return drawn


def test_width_plot_labels_every_layer_legibly(tmp_path, monkeypatch):
    report = _report(53)  # as many as ResNet-50 has convolutions
    figure, renderer = _plotted(report, tmp_path, monkeypatch)
    names = [name for name, _, _ in report.layers]
    axes = figure.axes[0]
    labels = [label for label in axes.get_xticklabels() + axes.get_yticklabels()
              if label.get_visible() and label.get_text() in set(names)]
    assert sorted(label.get_text() for label in labels) == sorted(names)  # every layer named once
    assert all(label.get_rotation() == 0 for label in labels)  # read without tilting the head
    assert min(label.get_fontsize() for label in labels) >= 7
    boxes = [label.get_window_extent(renderer) for label in labels]
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b)
    width, height = renderer.get_canvas_width_height()  # the saved image, in the renderer's pixels
    assert all(0 <= box.x0 and box.x1 <= width and 0 <= box.y0 and box.y1 <= height for box in boxes)  # not cut off
    assert figure.get_figwidth() <= 10  # shown at page width, so 8 pt stays 8 pt


def test_width_plot_grows_with_the_model(tmp_path, monkeypatch):
    small = _plotted(_report(10), tmp_path, monkeypatch)[0].get_figheight()
    monkeypatch.undo()
    large = _plotted(_report(110), tmp_path, monkeypatch)[0].get_figheight()
    assert large > 5 * small / 2  # a row per layer, not a squeezed fixed-size axis


def test_width_plot_of_a_report_without_layers(tmp_path, monkeypatch):
    _plotted(_report(0), tmp_path, monkeypatch)
