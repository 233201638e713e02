"""Progress bars: tqdm's widgets in a notebook that can show them, text everywhere else.

`tqdm.auto` picks the notebook bar whenever it runs inside Jupyter and warns when `ipywidgets` is
missing ("IProgress not found"); here the widget bar is chosen only when `ipywidgets` imports, so
a notebook without it gets the text bar silently, as a terminal does.
"""

from __future__ import annotations

import functools
import importlib.util


@functools.cache  # looked up once: `write` runs for every logged line
def _tqdm_class():
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar over `iterable` (or a manual one with `total=`), with tqdm's own arguments."""
    return _tqdm_class()(iterable, dynamic_ncols=True, **kwargs)


def steps_bar(iterable, enabled: bool, desc: str, **kwargs):
    """A bar over a loop's steps that clears when done; `enabled=False` gives the bare loop."""
    return progress_bar(iterable, desc=desc, leave=False, disable=not enabled, **kwargs)


def progress_write(message: str) -> None:
    """Print a line without breaking the progress bars on screen."""
    _tqdm_class().write(message)
