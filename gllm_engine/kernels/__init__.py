"""Triton kernels, each the twin of a pure-torch reference in `reference.py`.

Importing this package imports no Triton: the modules here (`attention`, `norm`, `activation`,
`rotary`) import it themselves and are loaded only when the Triton path is chosen.
"""
