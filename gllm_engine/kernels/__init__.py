"""Triton kernels, each the twin of a pure-torch reference in `reference.py`; `flash` puts the
flash-attn package's paged attention behind the same signatures.

Importing this package imports no Triton: the modules here (`attention`, `linear`, `norm`,
`activation`, `rotary`, `moe`, `sampling`, and `dot` and `launch`, which they share) import it
themselves and are loaded only when the Triton path is chosen.
"""
