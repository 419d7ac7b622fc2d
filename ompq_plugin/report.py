"""Human-readable views of a BitConfig: per-layer table and totals against budgets."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from ompq_plugin.bitconfig import BitConfig
from ompq_plugin.budgets import KIB_BITS

if TYPE_CHECKING:
    import numpy as np


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
    return [
        (
            "weight memory (KiB)",
            f"{used_kib:.2f}  ({float_kib / used_kib:.1f}x smaller than fp32, "
            f"avg {config.average_weight_bits:.2f} bit)",
            limit(b.weight_memory_bits, KIB_BITS, "{:.2f}"),
        ),
        ("BOPs (G)", f"{t.bops / 1e9:.3f}", limit(b.bops, 1e9, "{:.3f}")),
        (
            "largest act buffer (KiB)",
            f"{t.max_act_buffer_bits / KIB_BITS:.2f}",
            limit(b.act_buffer_bits, KIB_BITS, "{:.2f}"),
        ),
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
        spent = ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in timings.items())
        table.caption = f"time: {spent}"
    return table


def print_config(config: BitConfig, console: Console | None = None) -> None:
    if console is None:
        from ompq_plugin.cli.output import console as make_console

        console = make_console()
    console.print(layer_table(config))
    console.print(totals_table(config))


def plot_orm(orm: np.ndarray, names: list[str], path: str, title: str = "") -> None:
    """Save the ORM matrix K as a heat map (PNG/SVG/PDF by the file's extension), atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ompq_plugin.fileio import atomic_path

    size = max(5.0, 0.22 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(orm, vmin=0.0, vmax=1.0, cmap="viridis")
    ticks = range(len(names))
    ax.set_xticks(ticks, names, rotation=90, fontsize=6)
    ax.set_yticks(ticks, names, fontsize=6)
    ax.set_title(title or "ORM between layers (1 = same function, 0 = orthogonal)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    suffix = path.rsplit(".", 1)[-1] if "." in path else "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=suffix, dpi=150)
    plt.close(fig)
