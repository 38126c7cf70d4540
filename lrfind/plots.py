"""Plot helpers; matplotlib is imported here only, when a plot is asked for."""

from __future__ import annotations

import sys
from typing import Any


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where figures show inline), Colab's included.

    IPython is only looked at when already imported; a kernel's shell is a
    ``ZMQInteractiveShell`` or a subclass of it (as in Colab).
    """
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return any(c.__name__ == "ZMQInteractiveShell" for c in type(shell).__mro__)


def new_axes(ax: Any = None, ncols: int = 1) -> Any:
    """Return ``ax`` if given, else the Axes (an array when ``ncols > 1``) of a new figure.

    Outside notebooks the figure is not shown and nothing blocks; save it with
    ``ax.figure.savefig(path)``.
    """
    if ax is not None:
        return ax
    if in_notebook():
        import matplotlib.pyplot as plt

        return plt.subplots(1, ncols, figsize=(5 * ncols, 3.5), layout="tight")[1]
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * ncols, 3.5), layout="tight")
    return fig.subplots(1, ncols)
