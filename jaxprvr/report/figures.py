"""matplotlib (optional: the ``report`` extra) behind one door: figures on the Agg canvas, saved at a stated size.

Figures are ``matplotlib.figure.Figure`` objects with their own ``FigureCanvasAgg`` (no pyplot, no global backend
state); each is saved at :data:`DPI` without any tight-bbox cropping, so its PNG is exactly
``round(width_in * DPI) x round(height_in * DPI)`` pixels, the size the page states."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from jaxprvr.errors import JaxprvrError

DPI = 100
INSTALL_HINT = "pip install jaxprvr[report]"


def mpl():
    """``(Figure, FigureCanvasAgg)``; without matplotlib a one-line error saying how to install it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise JaxprvrError("matplotlib", "the plotting library of python -m jaxprvr.report",
                           f"it is not installed ({e})", hint=INSTALL_HINT) from None
    return Figure, FigureCanvasAgg


def new_figure(width_in: float, height_in: float, layout: str | None = None):
    Figure, Canvas = mpl()
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout=layout)
    Canvas(fig)
    return fig


def grid(n: int, ncols: int, panel_w: float, panel_h: float, top: float = 0.0):
    """A figure of ``n`` panels, ``ncols`` per row, each ``panel_w x panel_h`` inches with room for its title, tick
    labels and axis label (fixed margins: no layout engine to run), plus ``top`` inches above the panels (a
    legend); returns ``(fig, axes)`` (the ``n`` axes, row-major)."""
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    width, height = panel_w * ncols, panel_h * nrows + top
    fig = new_figure(width, height)
    gap_w, gap_h, left, right, bottom, head = 0.75, 0.7, 0.7, 0.2, 0.5, 0.3
    aw = (width - left - right - (ncols - 1) * gap_w) / ncols
    ah = (height - top - head - bottom - (nrows - 1) * gap_h) / nrows
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                        top=1 - (top + head) / height, wspace=gap_w / aw, hspace=gap_h / ah)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]
    return fig, axes


@dataclass
class Shown:
    """A saved figure as the page shows it: the file (relative to the report folder) and its pixel size."""

    file: str
    width: int
    height: int
    title: str
    caption: str = ""


def pixel_size(fig) -> tuple[int, int]:
    w, h = fig.get_size_inches()
    return int(round(w * DPI)), int(round(h * DPI))


def save(fig, out_dir: Path, file: str, title: str, caption: str = "") -> Shown:
    """Writes ``fig`` as ``out_dir/file`` (PNG at :data:`DPI`) and closes it."""
    fig.savefig(Path(out_dir) / file, dpi=DPI, format="png")
    w, h = pixel_size(fig)
    fig.clear()
    return Shown(file, w, h, title, caption)


def plain(text: str) -> str:
    """Text shown as typed (no mathtext: a caption's ``$`` stays a dollar sign)."""
    return str(text).replace("$", r"\$")
