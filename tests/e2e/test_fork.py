"""Forks over HTTP against a real API and worker on a real redis-server: `POST /sessions/{id}/fork` answers the fork
(201, `Location`, `ETag`, `forked_from`) with its parent's conversation up to a version, the two diverge, `GET
…/forks` lists the lineage, time travel and export work on the fork, a purge of the parent is refused (409
`has_forks`) while the fork reads its history, and bad input is a 4xx that writes nothing."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.helpers import ACME, GLOBEX, Stack, running_stack
from tests.support import API_KEYS


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("e2e-fork"), {"PARLEY_API_KEYS": API_KEYS}) as stack:
        yield stack


@pytest.fixture(scope="module")
def c(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api.url, timeout=15) as client:
        yield client


def new_session(c: httpx.Client, n: int) -> str:
    sid = c.post("/sessions", headers=ACME, json={"metadata": {"plan": "pro"}}).json()["id"]
    for i in range(n):
        assert (
            c.post(f"/sessions/{sid}/messages", headers=ACME, json={"role": "user", "content": f"m{i}"}).status_code
            == 201
        )
    return sid


def contents(c: httpx.Client, sid: str, **params: object) -> list[str]:
    r = c.get(f"/sessions/{sid}/messages", headers=ACME, params=params)
    assert r.status_code == 200, r.text
    return [m["content"] for m in r.json()["items"]]


def test_a_fork_over_http(c: httpx.Client) -> None:
    parent = new_session(c, 3)
    r = c.post(f"/sessions/{parent}/fork", headers=ACME, json={"version": 3, "metadata": {"branch": "b"}})
    assert r.status_code == 201, r.text
    fork = r.json()
    assert r.headers["location"] == f"/sessions/{fork['id']}" and r.headers["etag"] == f'"{fork["version"]}"'
    assert fork["forked_from"] == {"session_id": parent, "version": 3} and fork["metadata"] == {"branch": "b"}
    assert contents(c, fork["id"]) == ["m0", "m1"]
    assert (
        c.post(f"/sessions/{fork['id']}/messages", headers=ACME, json={"role": "user", "content": "f"}).status_code
        == 201
    )
    assert contents(c, fork["id"]) == ["m0", "m1", "f"] and contents(c, parent) == ["m0", "m1", "m2"]
    assert [s["id"] for s in c.get(f"/sessions/{parent}/forks", headers=ACME).json()["items"]] == [fork["id"]]
    events = c.get(f"/sessions/{fork['id']}/events", headers=ACME).json()["items"]
    assert [e["type"] for e in events[:2]] == ["SessionForked", "SessionCreated"]
    assert contents(c, fork["id"], version=3) == ["m0"]  # time travel into the copied history

    refused = c.delete(f"/sessions/{parent}", headers=ACME, params={"purge": "true"})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "has_forks", refused.text
    assert contents(c, parent) == ["m0", "m1", "m2"]  # the refused purge changed nothing
    assert c.delete(f"/sessions/{parent}", headers=ACME).status_code == 202  # a delete keeps the log it reads
    assert contents(c, fork["id"]) == ["m0", "m1", "f"]
    assert c.get(f"/sessions/{fork['id']}", headers=ACME).json()["forked_from"]["session_id"] == parent
    for sid in (fork["id"], parent):  # the fork first, then its parent
        assert c.delete(f"/sessions/{sid}", headers=ACME, params={"purge": "true"}).status_code == 202


def test_bad_forks_are_4xx_and_write_nothing(c: httpx.Client) -> None:
    parent = new_session(c, 1)
    before = c.get("/sessions", headers=ACME, params={"limit": 1000}).json()["items"]
    for body, status in (({"version": 0}, 422), ({"version": 99}, 404), ({"colour": "red"}, 422)):
        assert c.post(f"/sessions/{parent}/fork", headers=ACME, json=body).status_code == status, body
    assert c.post(f"/sessions/{parent}/fork", headers=GLOBEX, json={}).status_code == 404
    assert c.get(f"/sessions/{parent}/forks", headers=GLOBEX).status_code == 404
    assert c.get("/sessions", headers=ACME, params={"limit": 1000}).json()["items"] == before
