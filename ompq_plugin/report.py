"""Human-readable views of a BitConfig: per-layer table, totals against budgets, pictures (ORM
heat map with the chosen bits, per-layer bit chart)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.table import Table

from ompq_plugin.bitconfig import BitConfig
from ompq_plugin.budgets import KIB_BITS
from ompq_plugin.errors import OmpqError

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _num(value: float | None, fmt: str = "{:.3g}") -> str:
    return "-" if value is None else fmt.format(value)


def layer_table(config: BitConfig) -> Table:
    table = Table(title=f"{config.model} on {config.profile} ({config.method})", show_lines=False)
    for col in ("#", "layer", "kind", "W", "A", "params", "MACs", "KiB", "MBOPs", "gamma", "theta"):
        table.add_column(col, justify="left" if col in ("layer", "kind") else "right")
    for i, lb in enumerate(config.layers):
        table.add_row(
            str(i),
            lb.name,
            lb.kind,
            str(lb.weight_bits),
            str(lb.act_bits),
            f"{lb.params:,}",
            f"{lb.macs:,}",
            f"{lb.weight_memory_bits / KIB_BITS:.2f}",
            f"{lb.bops / 1e6:.1f}",
            _num(lb.gamma, "{:.2f}"),
            _num(lb.theta),
        )
    return table


def totals_rows(config: BitConfig) -> list[tuple[str, str, str]]:
    """(quantity, used, budget) rows in the CLI's units."""
    t, b = config.totals, config.budgets

    def limit(value: float, unit: float, fmt: str) -> str:
        return "no limit" if math.isinf(value) else fmt.format(value / unit)

    float_kib = config.total_params * 32 / KIB_BITS
    used_kib = max(t.weight_memory_bits, 1) / KIB_BITS
    fixed = config.fixed_layers
    widths = "/".join(str(b) for b in sorted({lb.weight_bits for lb in fixed}))
    extra = [(
        "of which: convs quantize / export add",
        f"{len(fixed)} conv{'s' if len(fixed) != 1 else ''}, {widths}-bit weights "
        f"({', '.join(lb.name for lb in fixed)}): together "
        f"{sum(lb.weight_memory_bits for lb in fixed) / KIB_BITS:.2f} KiB, "
        f"{sum(lb.bops for lb in fixed) / 1e9:.3f} G BOPs",
        "counted",
    )] if fixed else []
    return [
        (
            "weight memory (KiB)",
            f"{used_kib:.2f}  ({float_kib / used_kib:.1f}x smaller than fp32, "
            f"model layers avg {config.average_weight_bits:.2f} bit)",
            limit(b.weight_memory_bits, KIB_BITS, "{:.2f}"),
        ),
        ("BOPs (G)", f"{t.bops / 1e9:.3f}", limit(b.bops, 1e9, "{:.3f}")),
        (
            "largest act buffer (KiB)",
            f"{t.max_act_buffer_bits / KIB_BITS:.2f}",
            limit(b.act_buffer_bits, KIB_BITS, "{:.2f}"),
        ),
        *extra,
    ]


def totals_table(config: BitConfig) -> Table:
    table = Table(title="totals vs budgets")
    table.add_column("quantity")
    table.add_column("used", justify="right")
    table.add_column("budget", justify="right")
    for row in totals_rows(config):
        table.add_row(*row)
    timings = config.timings
    if timings:
        # seconds end in _s; the rest are counts (hessian_iterations, distortion_forwards)
        spent = ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" if k.endswith("_s")
                          else f"{k.replace('_', ' ')} {v:g}" for k, v in timings.items())
        table.caption = f"time: {spent}"
    return table


def print_config(config: BitConfig, console: Console | None = None) -> None:
    if console is None:
        from ompq_plugin.cli.output import console as make_console

        console = make_console()
    console.print(layer_table(config))
    console.print(totals_table(config))


# ------------------------------------------------------------------------------ pictures
# Every row of a chart gets the same height whatever the layer count (0.2 inch from 25 layers
# on), and label fonts follow the row height, so 60 layers (ResNet-56) stay readable.

PLOT_FORMATS = ("png", "svg", "pdf")
_ROW_IN = 0.2  # inches per layer row once a chart has more than ~25 layers


def check_plot_path(path: str | os.PathLike[str], flag: str) -> Path:
    """Refuse, before any work, a picture path with an unknown extension or no write access."""
    from ompq_plugin.fileio import check_writable

    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise OmpqError(f"{flag} {path}: unknown picture format {suffix or '(no extension)'!r}; "
                        f"end the name in one of {', '.join('.' + f for f in PLOT_FORMATS)}")
    return check_writable(path, flag)


def _label_points(rows: int, height_in: float) -> float:
    """A font size (points) that fits one label per row: 60 % of the row height, 4..9 pt."""
    return float(min(9.0, max(4.0, 0.6 * 72.0 * height_in / max(rows, 1))))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def orm_figure(orm: np.ndarray, names: list[str], title: str = "",
               config: BitConfig | None = None) -> Figure:
    """Heat map of the ORM matrix K; with ``config``, a bar per row shows the chosen bits."""
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    plt = _pyplot()
    n = len(names)
    side = max(4.0, _ROW_IN * n)
    font = _label_points(n, side)
    bars = 2.0 if config is not None else 0.0
    fig, ax = plt.subplots(figsize=(side + bars + 2.8, side + 2.2))
    image = ax.imshow(orm, vmin=0.0, vmax=1.0, cmap="viridis", aspect="equal")
    ticks = np.arange(n)
    ax.set_xticks(ticks, names, rotation=90, fontsize=font)
    ax.set_yticks(ticks, names, fontsize=font)
    ax.set_title(title or "ORM between layers (1 = same function, 0 = orthogonal)",
                 fontsize=max(font, 9))
    divider = make_axes_locatable(ax)  # side panels keep the heat map's rows
    if config is not None:
        _bit_bars(divider.append_axes("right", size=bars, pad=0.1, sharey=ax), config, names,
                  font)
    cax = divider.append_axes("right", size=0.25, pad=0.15)
    fig.colorbar(image, cax=cax).set_label("ORM", fontsize=max(font, 8))
    return fig


def _bit_bars(ax: Any, config: BitConfig, names: list[str], font: float) -> None:
    """Weight bits as horizontal bars aligned with ``names`` (rows), with W/A written on them."""
    by_name = config.by_name()
    rows = [by_name.get(name) for name in names]
    wbits = [lb.weight_bits if lb else 0 for lb in rows]
    y = np.arange(len(names))
    ax.barh(y, wbits, height=0.7, color="tab:blue")
    top = max(wbits + [8])
    for i, lb in enumerate(rows):
        if lb is not None:
            ax.text(lb.weight_bits + 0.2, i, f"W{lb.weight_bits}/A{lb.act_bits}",
                    va="center", fontsize=font)
    ax.set_xlim(0, top * 1.9)
    ax.set_xticks(range(0, top + 1, 2))
    ax.tick_params(axis="y", left=False, labelleft=False)
    ax.tick_params(axis="x", labelsize=max(font, 7))
    ax.set_xlabel("weight bits", fontsize=max(font, 8))


def bits_figure(config: BitConfig, title: str = "") -> Figure:
    """Per-layer chart of the chosen weight and activation bits, one row per layer."""
    plt = _pyplot()
    n = len(config.layers)
    height = max(3.0, _ROW_IN * n)
    font = _label_points(n, height)
    fig, ax = plt.subplots(figsize=(7.5, height + 1.4))
    y = np.arange(n)
    w = [lb.weight_bits for lb in config.layers]
    a = [lb.act_bits for lb in config.layers]
    ax.barh(y - 0.2, w, height=0.4, color="tab:blue", label="weight bits")
    ax.barh(y + 0.2, a, height=0.4, color="tab:orange", label="activation bits (input)")
    for i, lb in enumerate(config.layers):
        ax.text(max(lb.weight_bits, lb.act_bits) + 0.2, i, f"W{lb.weight_bits}/A{lb.act_bits}",
                va="center", fontsize=font)
    ax.set_yticks(y, [lb.name for lb in config.layers], fontsize=font)
    ax.set_ylim(n - 0.5, -0.5)
    top = max(w + a + [8])
    ax.set_xlim(0, top + 3)
    ax.set_xlabel("bits", fontsize=max(font, 8))
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, frameon=False,
              fontsize=max(font, 7))
    ax.set_title(title or f"{config.model} on {config.profile}: average weight bits "
                 f"{config.average_weight_bits:.2f}", fontsize=max(font, 9), pad=22)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], fmt: str | None = None) -> Path:
    """Write ``fig`` atomically in ``fmt`` (default: the file's extension); close it."""
    from ompq_plugin.fileio import atomic_path

    fmt = fmt or Path(path).suffix.lower().lstrip(".") or "png"
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return Path(path)


def plot_orm(orm: np.ndarray, names: list[str], path: str | os.PathLike[str], title: str = "",
             config: BitConfig | None = None) -> Path:
    """Save the ORM heat map (with the chosen bits if ``config`` is given); see orm_figure."""
    return save_figure(orm_figure(orm, names, title, config), path)


def plot_bits(config: BitConfig, path: str | os.PathLike[str], title: str = "") -> Path:
    """Save the per-layer bit chart; see :func:`bits_figure`."""
    return save_figure(bits_figure(config, title), path)
