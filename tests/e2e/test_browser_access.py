"""What a browser page needs, end to end over HTTP: CORS (preflights, exposed headers, the guard's own refusals)
and stream tokens (minted with a key, accepted only as `?token=` on their own session's event streams).

The headless-browser test (tests/clients) drives a real Chromium through the same paths; this module pins the
protocol details a browser hides.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime

import httpx
import pytest

from tests.e2e.helpers import ACME, GLOBEX, Stack, add_message, assert_error, create, running_stack
from tests.support import API_KEYS

ORIGIN = "http://page.example:5173"
SSE = {"Accept": "text/event-stream"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {
        "PARLEY_API_KEYS": API_KEYS,
        "PARLEY_CORS_ORIGINS": ORIGIN,
        "PARLEY_SSE_KEEPALIVE_S": "0.3",
        "PARLEY_LOG_LEVEL": "DEBUG",
    }
    with running_stack(tmp_path_factory.mktemp("e2e-browser"), env) as stack:
        yield stack


@pytest.fixture(scope="module")
def c(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api.url, timeout=15) as client:
        yield client


def mint(c: httpx.Client, sid: str, headers: dict[str, str] = ACME, **body: object) -> dict:
    resp = c.post(f"/sessions/{sid}/stream-tokens", json=body, headers=headers)
    assert resp.status_code == 201, resp.text
    return resp.json()


def first_frame(c: httpx.Client, path: str, **params: str) -> tuple[int, bytes]:
    """(status, the first SSE block or the whole body) of a GET opened with a token and no key."""
    with c.stream("GET", path, params=params, headers=SSE, timeout=httpx.Timeout(10, read=5)) as resp:
        if resp.status_code != 200:
            return resp.status_code, resp.read()
        buf = b""
        for chunk in resp.iter_bytes():
            buf += chunk
            if b"\nid: " in buf or buf.count(b"\n\n") >= 1 and b"id: " in buf:
                break
        return 200, buf


# -- CORS ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/sessions", "/sessions/{sid}/events?token=t.x", "/sessions/{sid}/messages"])
def test_a_preflight_is_answered_without_credentials_even_with_a_token_in_the_url(c, path):
    sid = create(c)["id"]
    resp = c.options(
        path.format(sid=sid),
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, last-event-id",
        },
    )
    assert resp.status_code in (200, 204), resp.text
    assert resp.headers["access-control-allow-origin"] == ORIGIN
    allowed = resp.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "last-event-id" in allowed


def test_a_preflight_from_another_origin_is_not_allowed(c):
    resp = c.options("/sessions", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert (
        "access-control-allow-origin" not in resp.headers
        or resp.headers["access-control-allow-origin"] != "http://evil.example"
    )


def test_answers_to_the_origin_expose_what_a_page_reads(c):
    resp = c.post("/sessions", json={}, headers={**ACME, "Origin": ORIGIN})
    assert resp.status_code == 201
    assert resp.headers["access-control-allow-origin"] == ORIGIN
    exposed = {h.strip().lower() for h in resp.headers["access-control-expose-headers"].split(",")}
    assert {"etag", "location", "retry-after", "last-event-id"} <= exposed, exposed


def test_the_guards_own_refusal_carries_cors_too(c):
    """A 401 for a bad stream token is the guard's answer, not litestar's: a page must still be able to read it."""
    sid = create(c)["id"]
    resp = c.get(f"/sessions/{sid}/events", params={"token": "forged.token"}, headers={**SSE, "Origin": ORIGIN})
    assert_error(resp, 401, "unauthorized")
    assert resp.headers["access-control-allow-origin"] == ORIGIN


# -- stream tokens ---------------------------------------------------------------------------------------


def test_a_token_opens_its_sessions_event_stream_without_a_key(c):
    sid = create(c)["id"]
    add_message(c, sid, {"role": "user", "content": "hello from the page"})
    token = mint(c, sid)
    assert token["session_id"] == sid
    expires = datetime.fromisoformat(token["expires_at"].replace("Z", "+00:00")).timestamp()
    assert time.time() + 200 < expires <= time.time() + 301  # the default, PARLEY_STREAM_TOKEN_TTL_S = 300
    status, frame = first_frame(c, f"/sessions/{sid}/events", token=token["token"])
    assert status == 200 and b"event: SessionCreated" in frame, frame


def test_a_token_opens_nothing_else(c):
    sid, other = create(c)["id"], create(c)["id"]
    token = mint(c, sid, ttl_s=60)["token"]
    # another session's stream
    assert_error(c.get(f"/sessions/{other}/events", params={"token": token}, headers=SSE), 401, "unauthorized")
    # the events page (not a stream), the session, its messages, a write
    assert_error(c.get(f"/sessions/{sid}/events", params={"token": token}), 401, "unauthorized")
    assert_error(c.get(f"/sessions/{sid}", params={"token": token}), 401, "unauthorized")
    assert_error(c.get(f"/sessions/{sid}/messages", params={"token": token}), 401, "unauthorized")
    resp = c.post(f"/sessions/{sid}/messages", params={"token": token}, json={"role": "user", "content": "x"})
    assert_error(resp, 401, "unauthorized")
    assert c.get(f"/sessions/{sid}/messages", headers=ACME).json()["items"] == []  # nothing was written


def test_a_tampered_or_foreign_token_is_refused(c):
    sid = create(c)["id"]
    token = mint(c, sid)["token"]
    payload, mac = token.split(".")
    flipped = payload[:-1] + ("A" if payload[-1] != "A" else "B")
    for bad in (f"{flipped}.{mac}", f"{payload}.{mac[:-2]}", "no-dot", "", "x" * 2000):
        assert_error(c.get(f"/sessions/{sid}/events", params={"token": bad}, headers=SSE), 401, "unauthorized")


def test_a_token_is_minted_only_for_the_tenants_own_session(c):
    sid = create(c)["id"]
    assert_error(c.post(f"/sessions/{sid}/stream-tokens", json={}, headers=GLOBEX), 404)
    assert_error(c.post(f"/sessions/{sid}/stream-tokens", json={}), 401)
    assert_error(c.post(f"/sessions/{sid}/stream-tokens", json={"ttl_s": 5}, headers=ACME), 422, "validation_failed")
    assert_error(
        c.post(f"/sessions/{sid}/stream-tokens", json={"ttl_s": 60, "scope": "all"}, headers=ACME),
        422,
        "validation_failed",
    )


def test_an_expired_token_is_refused(c):
    sid = create(c)["id"]
    token = mint(c, sid, ttl_s=10)["token"]
    assert first_frame(c, f"/sessions/{sid}/events", token=token)[0] == 200
    time.sleep(11)
    assert_error(c.get(f"/sessions/{sid}/events", params={"token": token}, headers=SSE), 401, "unauthorized")


def test_a_token_is_never_logged(stack: Stack, c):
    sid = create(c)["id"]
    token = mint(c, sid)["token"]
    first_frame(c, f"/sessions/{sid}/events", token=token)
    c.get(f"/sessions/{sid}/events", params={"token": token + "x"}, headers=SSE)
    logs = stack.api.log_path.read_text(errors="replace")
    assert "Application startup complete" in logs, "the API's log is where the test looks"
    assert token.split(".")[0] not in logs and token.split(".")[1] not in logs
