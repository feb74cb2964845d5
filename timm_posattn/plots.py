"""matplotlib for the commands that draw figures: the file backend, chosen in one place.

Every figure is written to a file (no display), so pyplot is always used with the Agg backend; matplotlib is
imported only when a figure is drawn.
"""
from types import ModuleType

__all__ = ['pyplot']


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg (file) backend."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt
