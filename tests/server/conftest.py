"""Fixtures of the policy-server tests: an HTTP client on the session's one `policy_server`."""

from __future__ import annotations

import httpx
import pytest


@pytest.fixture(scope="module")
def client(policy_server):
    with httpx.Client(base_url=policy_server.base_url, timeout=120) as c:
        yield c
