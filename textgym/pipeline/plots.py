"""matplotlib for the pipeline's PNG plots."""

from __future__ import annotations


def pyplot():
    """matplotlib's ``pyplot`` on the file-only Agg backend (no display needed)."""
    import matplotlib  # imported on first plot: a slow import that only plotting needs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"), so no GUI backend is ever loaded

    return plt


def save(fig, path) -> None:
    """Lay ``fig`` out, write it as a PNG at ``path`` and free it (pyplot keeps every open figure)."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
