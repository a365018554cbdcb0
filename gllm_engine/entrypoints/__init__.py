"""User-facing entry points: the offline LLM and the async front end."""
