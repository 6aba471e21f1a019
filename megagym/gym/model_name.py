"""The model name a policy server serves (what Gym's model proxy must send as `model`).

Owns: `model_name_of(base_url)` — the first model id listed at `GET {base_url}/models`, with the
run's bearer key when one is set. Must not: retry or wait (the caller's servers are up already).
"""

from __future__ import annotations

import httpx

from megagym.gym.errors import GymError


def model_name_of(base_url: str, timeout: float = 10.0, api_key: str = "") -> str:
    """The first model id a policy server lists at GET {base_url}/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key and api_key != "dummy" else {}
    try:
        r = httpx.get(f"{base_url.rstrip('/')}/models", timeout=timeout, headers=headers)
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise GymError(f"could not read the model name from {base_url}/models: {e!r}; "
                       "set env.policy_model_name") from None
