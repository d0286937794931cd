"""Finding sessions over real HTTP on a real redis-server: `GET /sessions` filters, sorts, pages by cursor and
answers only the fields asked for; `GET /sessions/count` agrees with it; updates move a session, deletes drop it,
tenants never see each other's; bad input is a 422 that changes nothing; `parley rebuild` reproduces the index."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis as redis_sync

from tests.e2e.helpers import ACME, GLOBEX, Stack, assert_error, create, running_stack
from tests.support import API_KEYS, ROOT


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("e2e-search"), {"PARLEY_API_KEYS": API_KEYS}) as stack:
        yield stack


@pytest.fixture(scope="module")
def c(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api.url, timeout=15) as client:
        yield client


@pytest.fixture(scope="module")
def seeded(c: httpx.Client) -> list[dict[str, Any]]:
    """Twenty of acme's sessions (agent `search-a` or `search-b`, users s0..s3, a metadata tier) and one of globex's."""
    out = []
    for i in range(20):
        body = {"agent_id": f"search-{'ab'[i % 2]}", "user_id": f"s{i % 4}", "metadata": {"tier": i % 3, "k": "v"}}
        out.append(create(c, body))
    create(c, {"agent_id": "search-a"}, headers=GLOBEX)
    return out


def page(c: httpx.Client, headers: dict[str, str] = ACME, **params: Any) -> dict[str, Any]:
    resp = c.get("/sessions", params=params, headers=headers)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"items", "next"}
    return body


def walk(c: httpx.Client, **params: Any) -> list[str]:
    """Every id a cursor walk answers, in order."""
    out: list[str] = []
    after = None
    while True:
        body = page(c, **params, **({"after": after} if after else {}))
        out += [s["id"] for s in body["items"]]
        after = body["next"]
        if after is None:
            return out


def count(c: httpx.Client, headers: dict[str, str] = ACME, **params: Any) -> int:
    resp = c.get("/sessions/count", params=params, headers=headers)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["exact"] is True
    return body["count"]


def test_filters_sort_and_a_cursor_walk_answer_every_match_once(c, seeded):
    a = [s["id"] for s in reversed(seeded) if s["agent_id"] == "search-a"]
    assert walk(c, agent_id="search-a", limit=3) == a
    assert walk(c, agent_id="search-a", sort="created_at", limit=4) == a[::-1]
    assert [s["id"] for s in page(c, agent_id="search-a", limit=100)["items"]] == a
    assert page(c, agent_id="search-a", limit=100)["next"] is None
    both = [s["id"] for s in reversed(seeded) if s["agent_id"] == "search-a" and s["user_id"] == "s1"]
    assert walk(c, agent_id="search-a", user_id="s1", limit=2) == both
    tier = [s["id"] for s in reversed(seeded) if s["metadata"]["tier"] == 2]
    assert walk(c, **{"metadata.tier": "2", "metadata.k": "v"}, limit=5) == tier
    mid = seeded[10]["created_at"]
    later = walk(c, agent_id="search-a", created_after=mid)
    assert later == [s["id"] for s in reversed(seeded[10:]) if s["agent_id"] == "search-a"]
    earlier = [s["id"] for s in reversed(seeded[:11]) if s["agent_id"] == "search-a"]  # bounds are inclusive
    assert walk(c, agent_id="search-a", updated_before=mid) == earlier
    assert count(c, agent_id="search-a") == len(a)
    assert count(c, agent_id="search-a", user_id="s1") == len(both)
    assert count(c, **{"metadata.tier": "2"}) == len(tier)
    assert count(c, agent_id="search-a", created_after=mid) == len(later)
    assert count(c, status="busy") == 0


def test_null_is_a_value_not_an_absent_filter(c, seeded):
    assert page(c, agent_id="null")["items"] == []
    assert count(c, user_id="null") == 0


def test_fields_answers_only_those_fields(c, seeded):
    body = page(c, agent_id="search-b", fields="user_id,metadata", limit=2)
    assert [set(s) for s in body["items"]] == [{"id", "user_id", "metadata"}] * 2
    assert body["items"][0]["metadata"] == seeded[-1]["metadata"]


def test_an_update_moves_a_session_and_a_delete_drops_it(c, seeded):
    target = create(c, {"agent_id": "search-move"})
    other = create(c, {"agent_id": "search-move"})
    assert walk(c, agent_id="search-move", sort="-updated_at") == [other["id"], target["id"]]
    resp = c.patch(f"/sessions/{target['id']}", json={"metadata": {"x": 1}}, headers=ACME)
    assert resp.status_code == 200, resp.text
    assert walk(c, agent_id="search-move", sort="-updated_at") == [target["id"], other["id"]]
    resp = c.patch(f"/sessions/{target['id']}", json={"agent_id": "search-moved"}, headers=ACME)
    assert resp.status_code == 200, resp.text
    assert walk(c, agent_id="search-move") == [other["id"]]
    assert walk(c, agent_id="search-moved") == [target["id"]]
    assert c.delete(f"/sessions/{other['id']}", headers=ACME).status_code == 202
    assert walk(c, agent_id="search-move") == []
    assert count(c, agent_id="search-move") == 0


def test_tenants_are_isolated(c, seeded):
    theirs = walk(c, agent_id="search-a", **{"limit": 50})
    mine = [s["id"] for s in page(c, GLOBEX, agent_id="search-a")["items"]]
    assert len(mine) == 1 and not set(mine) & set(theirs)
    assert count(c, GLOBEX, agent_id="search-a") == 1
    # a cursor of acme's query is only a position: globex walking from it sees its own sessions only
    after = page(c, agent_id="search-a", limit=1)["next"]
    items = page(c, GLOBEX, agent_id="search-a", after=after)["items"]
    assert not {s["id"] for s in items} & set(theirs)


@pytest.mark.parametrize(
    "params",
    [
        {"sort": "name"},
        {"created_after": "yesterday"},
        {"created_after": "0"},
        {"updated_before": "2024-13-01T00:00:00Z"},
        {"fields": "id,secret"},
        {"after": "not-a-cursor"},
        {"after": "!!"},
        {"status": "running"},
        {"status": "null"},
        {"agent": "search-a"},
        {"limit": 0},
        {"offset": 1, "agent_id": "search-a"},
    ],
)
def test_bad_input_is_a_422_that_changes_nothing(c, seeded, params):
    before = walk(c, limit=1000)
    assert_error(c.get("/sessions", params=params, headers=ACME), 422)
    assert walk(c, limit=1000) == before


def test_a_cursor_of_another_query_is_refused(c, seeded):
    after = page(c, agent_id="search-a", limit=1)["next"]
    err = assert_error(c.get("/sessions", params={"agent_id": "search-b", "after": after}, headers=ACME), 422)
    assert err["details"] == {"query": "after"}
    assert_error(c.get("/sessions/count", params={"sort": "created_at"}, headers=ACME), 422)


def test_the_deprecated_offset_still_pages_and_gives_a_cursor(c, seeded):
    everything = walk(c, limit=1000)
    body = page(c, offset=2, limit=3)
    assert [s["id"] for s in body["items"]] == everything[2:5]
    assert [s["id"] for s in page(c, after=body["next"], limit=2)["items"]] == everything[5:7]


def test_a_rebuild_reproduces_the_index(stack, c, seeded):
    queries: list[dict[str, Any]] = [
        {"agent_id": "search-a"},
        {"sort": "updated_at"},
        {"metadata.tier": "1", "sort": "-updated_at"},
    ]
    before = [walk(c, **q) for q in queries]
    counts = [count(c, **q) for q in ({"agent_id": "search-b"}, {"user_id": "s2"})]
    # lose the index entirely (as an index written by older code would be): the rebuild folds it from the logs
    r = redis_sync.Redis.from_url(stack.redis.url)
    r.delete(*r.keys("parley:*:search:acme"))
    r.close()
    assert walk(c, agent_id="search-a") == []
    env = {**stack.api.env, "REDIS_URL": stack.redis.url, "PARLEY_LOG_LEVEL": "WARNING"}
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "rebuild", "--all"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert [walk(c, **q) for q in queries] == before
    assert [count(c, **q) for q in ({"agent_id": "search-b"}, {"user_id": "s2"})] == counts


def test_the_openapi_document_states_each_parameter(c):
    doc = c.get("/schema/openapi.json").json()
    listing = {p["name"]: p for p in doc["paths"]["/sessions"]["get"]["parameters"]}
    times = {"created_after", "created_before", "updated_after", "updated_before"}
    filters = {"agent_id", "user_id", "status", *times}
    assert set(listing) == filters | {"sort", "fields", "after", "limit", "offset"}
    assert listing["sort"]["schema"]["enum"] == ["created_at", "-created_at", "updated_at", "-updated_at"]
    assert listing["status"]["schema"]["enum"] == ["idle", "busy"] and listing["status"]["schema"]["type"] == "string"
    assert all(listing[t]["schema"]["format"] == "date-time" for t in times)
    assert listing["offset"]["deprecated"] is True and not listing["after"].get("deprecated")
    assert "metadata.<key>" in doc["paths"]["/sessions"]["get"]["description"]
    counting = doc["paths"]["/sessions/count"]["get"]
    assert {p["name"] for p in counting["parameters"]} == filters
    assert counting["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/SessionCount")
    page = doc["components"]["schemas"]["SessionList"]
    assert set(page["required"]) == {"items", "next"}
