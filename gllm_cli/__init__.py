"""The gllm command-line toolkit: serve, chat, bench, eval and profile."""
