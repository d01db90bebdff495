"""prefops: preference optimisation for LLMs and text-to-image diffusion models.

``import prefops`` is cheap: it loads the Rust extension for data preparation and nothing
else (no torch, no triton, no GPU probing).
"""

from prefops._native import DataError
from prefops.data import FORMATS, STRATEGIES, THREADS_ENV, PrepResult, prep, sample_path

try:
    from importlib.metadata import version as _version

    __version__ = _version("prefops")
except Exception:  # pragma: no cover - running from a source tree without metadata
    __version__ = "0.0.0"

__all__ = [
    "DataError",
    "FORMATS",
    "STRATEGIES",
    "THREADS_ENV",
    "PrepResult",
    "prep",
    "sample_path",
    "__version__",
]
