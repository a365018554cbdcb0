"""What the CLI needs to talk to an OpenAI-compatible server: error messages and the served model."""

from __future__ import annotations

from typing import Any

import httpx


def checked(response: httpx.Response) -> httpx.Response:
    """`response` if it is a success; otherwise ValueError with the server's error message."""
    if response.is_success:
        return response
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:200]
    raise ValueError(f"the server answered {response.status_code}: {message}")


def server_root(url: str) -> str:
    """The server's root from an API base URL: http://host:8000/v1 -> http://host:8000 (where /metrics lives)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def served_model(client: httpx.AsyncClient) -> dict[str, Any]:
    """The first entry of the server's /models (`id`, and `max_model_len` where the server says it).

    ValueError when the server cannot be reached or lists no model.
    """
    try:
        response = await client.get("/models")
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach {client.base_url}: {e}") from None
    models = checked(response).json().get("data") or []
    if not models:
        raise ValueError(f"{client.base_url}/models lists no model")
    return models[0]
