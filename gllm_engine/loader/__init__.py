"""Model files: find them (HF directory, GGUF file, dummy), read config, tokenizer and weights.

`model_files.resolve_model_files` decides what a model argument means; `ModelFiles` reads it;
`weights.load_model_weights` streams the tensors into a gLLM model. Every user-facing failure is
a `ModelLoadError` whose message says what is wrong and how to fix it.
"""


class ModelLoadError(Exception):
    """One clear line for users: what is wrong and how to fix it."""
