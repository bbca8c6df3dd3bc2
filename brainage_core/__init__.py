"""brainage_core: the tested package behind the interpretable brain-age study.

Every computation of the study lives here; the notebooks in ``notebooks/`` only set
parameters, call this package and display results.
"""

import warnings as _warnings

__version__ = "0.1.0"

# Progress bars come from ``tqdm.auto``: a widget in a notebook when ipywidgets is
# installed, a text bar otherwise. Without ipywidgets tqdm warns ("IProgress not found")
# on import, which would print into every executed notebook of the book; the text bar it
# falls back to is what we want, so the import is done once here with that warning muted.
with _warnings.catch_warnings():
    from tqdm import TqdmWarning as _TqdmWarning

    _warnings.simplefilter("ignore", _TqdmWarning)
    import tqdm.auto as _tqdm_auto  # noqa: F401
