"""prefops: preference optimisation for LLMs and text-to-image diffusion models.

``import prefops`` is cheap: it loads the Rust extension for data preparation and nothing
else (no torch, no triton, no GPU probing).
"""

from prefops._native import DataError
from prefops.data import FORMATS, STRATEGIES, THREADS_ENV, PrepResult, prep, sample_path
from prefops.steps import StepResult, convert, curriculum, flip_labels, reward_augment, tokenize_pairs
from prefops.lists import ListResult, ListTensors, list_tensors, lists
from prefops.fifa import fifa_filter, knn_entropy, knn_radius, knn_search

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
    "StepResult",
    "curriculum",
    "flip_labels",
    "reward_augment",
    "tokenize_pairs",
    "convert",
    "ListResult",
    "ListTensors",
    "list_tensors",
    "lists",
    "fifa_filter",
    "knn_search",
    "knn_radius",
    "knn_entropy",
    "__version__",
]


def __getattr__(name):
    # CurriculumSampler subclasses torch's Sampler when torch is installed: built on first
    # access so that `import prefops` stays free of torch.
    if name == "CurriculumSampler":
        from prefops.steps import _sampler_class

        return _sampler_class()
    raise AttributeError(f"module 'prefops' has no attribute {name!r}")
