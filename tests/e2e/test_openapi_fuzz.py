"""Fuzz the HTTP API against the OpenAPI document it serves (schemathesis), on a real stack.

One redis-server, `parley api` and `parley worker` of this module's own. The document is loaded over HTTP from the
running API (`/schema/openapi.json`), so what is checked is what clients get. Every operation is fuzzed once per
tenant: acme authenticates with `Authorization: Bearer`, globex with `X-Auth-Key` (the document's two security
schemes). Before fuzzing, each tenant gets real sessions, messages and chat jobs, and hooks swap generated path ids
for real ones (mostly the tenant's own, sometimes the other tenant's, and a deleted session) in about half of the
cases, so requests reach existing resources and foreign ones, not only 404s. Generated request bodies are open
objects in the document (no `additionalProperties: false`) while the API refuses unknown fields; half of the
positive fuzzing bodies are therefore sent with only the documented fields, so that they reach the handlers.

Checks on every response (schemathesis's, plus Parley's own):
  not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
  response_schema_conformance, unsupported_method (405 + Allow for methods an operation lacks),
  positive_data_acceptance (a request valid per the document is not refused with a 4xx other than 404/409/412,
  which depend on state), negative_data_rejection (a request invalid per the document is refused),
  parley_error_shape (every 4xx/5xx is `{"error": {status, code, message, details?}}`, `status` == the HTTP
  status, as application/json), parley_headers_documented (ETag, Location, Retry-After, WWW-Authenticate and Allow
  are declared where the API sends them), tenant_isolation (another tenant's real session answers 404, never its
  data or state), finished_streams_end (a finished chat job's event stream ends, whatever `Last-Event-ID`).

Findings do not stop the fuzzing: every case of every operation is sent and checked, each failure is recorded, and
`test_no_contract_violations` (last in this module) fails with all distinct violations grouped by operation, check,
status and the server's error, each with its shortest reproducing curl, plus the API process's tracebacks. Run the
whole module (`pytest tests/e2e/test_openapi_fuzz.py`); `PARLEY_FUZZ_REPORT=path.json` also writes the report as
JSON.

Bounds (a 2-core machine runs the module in about 2 minutes): `MAX_EXAMPLES` generated cases per operation and
tenant, plus schemathesis's deterministic coverage phase (boundary and invalid values of every parameter and body
field, unexpected methods); no shrinking (a failure is recorded as found), no example database; a fixed seed per
tenant, so CI and a local run generate the same requests. Hypothesis's per-example `deadline` stays off, as
schemathesis sets it (a real network and a worker make per-example timings noise): instead every request has a
`REQUEST_TIMEOUT_S` deadline, and a request that misses it is a finding.

Not fuzzed as generated, and why (nothing else is excluded):
  - `Accept` is forced to `application/json`. `GET /sessions/{id}/events` with `Accept: text/event-stream` follows
    the log live and never ends for a live session, so a generated `Accept` would hold each such case until the
    request deadline. `test_directed_probes` checks the SSE variant on a deleted session, whose stream ends.
  - Synchronous and streamed chat (`POST /chat` without `Prefer: respond-async`, `stream: true`) are fuzzed as
    generated: the stack's built-in offline model answers in milliseconds, and `PARLEY_CHAT_WAIT_S` bounds a wait.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from schemathesis import Case
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from schemathesis.core.errors import InvalidSchema
from schemathesis.core.failures import FailureGroup
from schemathesis.generation.jsonschema import strategy as _jsonschema_strategy

from tests.e2e.helpers import ACME, GLOBEX, Stack, running_stack, tool, unknown_id
from tests.support import TENANTS

MAX_EXAMPLES = 25
"""Generated (fuzzing phase) cases per operation and tenant, positive and negative together."""
REQUEST_TIMEOUT_S = 10.0
"""Every request's deadline; a request without a complete answer by then is a finding."""
CHAT_WAIT_S = 5.0
"""The stack's PARLEY_CHAT_WAIT_S: how long a synchronous chat waits for its answer before a 504."""
MAX_BODY_BYTES = 65_536
"""The stack's PARLEY_MAX_BODY_BYTES (default 1 MiB): smaller, so that the over-the-limit probe is cheap."""
SEED = 20261203
"""Changed from 20260401 on 2026-12-03: with that seed schemathesis 4.32.x's negative generation for the chat body
raised its own `InvalidSchema: Cannot generate an array with 1 demanded elements` (its strategy's bug, seen with an
unchanged document after an upgrade: no request was sent). It came back with this seed too: `_repeated_or_nothing`
now keeps it from failing an operation's generation."""
TENANT_AUTH = {
    "acme": {"Authorization": f"Bearer {TENANTS['acme']}"},  # the `bearer` security scheme
    "globex": {"X-Auth-Key": TENANTS["globex"]},  # the `apiKey` security scheme
}
ERROR_KEYS = {"status", "code", "message", "details"}
OPENAI_ERROR_KEYS = ERROR_KEYS | {"type", "param"}
"""The OpenAI drop-in (tag `openai`: `/chat/completions`, `/models`) adds OpenAI's `type` and `param` to the error;
the document says so there (`OpenAIErrorBody`)."""
STATE_DEPENDENT = ["2xx", "404", "409", "412", "5xx"]
"""What a request valid per the document may still answer: its resource may not exist or be another tenant's (404),
the session may be busy or the job ended (409), an `If-Match` may be stale (412). (A 5xx is not_a_server_error's.)"""
REFUSALS = ["400", "401", "404", "405", "409", "412", "413", "415", "422", "5xx"]
"""What a request invalid per the document may answer: Parley's refusals (schemathesis's default list lacks 412 and
413). (A 5xx is not_a_server_error's.)"""
STATE_DEPENDENT_CODES = {"idempotency_key_reused", "token_budget_exceeded", "webhook_url_refused"}
"""422s that answer the state, not the request: an Idempotency-Key an earlier case used with another body (generated
keys repeat: "", "0", "null"), a prompt over the session's token budget, and a webhook URL whose host does not resolve
or resolves to a private address (DNS, not the document, decides). positive_data_acceptance failures with
these codes say nothing about the document; they are counted, not reported."""
SCHEDULE_RULES = {"cron_expression", "iana_time_zone", "min_interval", "max_schedules"}
"""A schedule refused for what its schema can only describe: a cron expression that matches the pattern but has no
ticks (minute 61, 30 February) or ticks too often, a zone name that is not in the IANA database, a session at its
number of schedules."""
DOCUMENTED_HEADERS = ("etag", "location", "retry-after", "www-authenticate", "allow")
"""Headers with meaning for a client: where the API sends one, the document must declare it for that response."""


# -- what the run found ------------------------------------------------------------------------------------------
@dataclass
class Finding:
    operation: str
    check: str
    status: int | None
    title: str
    message: str
    reason: str
    count: int = 0
    curl: str = ""
    response: str = ""
    tenants: set[str] = field(default_factory=set)


@dataclass
class Findings:
    cases: int = 0
    state_refusals: int = 0
    by_key: dict[tuple[str, str, int | None, str], Finding] = field(default_factory=dict)
    statuses: dict[str, dict[int, int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def response(self, operation: str, status: int) -> None:
        with self.lock:
            self.cases += 1
            per = self.statuses.setdefault(operation, {})
            per[status] = per.get(status, 0) + 1

    def add(
        self,
        tenant: str,
        operation: str,
        check: str,
        status: int | None,
        title: str,
        message: str,
        curl: str,
        body: bytes,
    ) -> None:
        reason = _reason(check, message, body)
        key = (operation, check, status, reason)
        with self.lock:
            if check == "positive_data_acceptance" and (
                reason.split(":")[0] in STATE_DEPENDENT_CODES or _refused_for_state(operation, body)
            ):
                self.state_refusals += 1
                return
            f = self.by_key.get(key)
            if f is None:
                f = self.by_key[key] = Finding(operation, check, status, title, message, reason)
            f.count += 1
            f.tenants.add(tenant)
            if not f.curl or len(curl) < len(f.curl):  # the shortest example reproduces best
                f.curl, f.message = curl, message
                f.response = body[:400].decode("utf-8", "replace")


def _refused_for_state(operation: str, body: bytes) -> bool:
    """A valid request refused for what no schema can say: a tool result that answers no open call of the session,
    an `/audit` or `/sessions` cursor the server never gave out (cursors are opaque), two tools of one name, the
    deprecated `offset` of `/sessions` beside a filter."""
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    details = err.get("details")
    if isinstance(details, dict) and details.get("rule") == "answers_an_open_call":
        return True
    if isinstance(details, dict) and details.get("field") == "tools" and "duplicates" in details:
        return True  # tool names unique by name: a rule no JSON Schema can state (the document's description does)
    if isinstance(details, dict) and details.get("rule") in SCHEDULE_RULES:
        return True
    if operation == "GET /sessions" and isinstance(details, dict) and details.get("query") in ("after", "offset"):
        return True  # a session list cursor the server never gave out; the deprecated offset with a filter
    return operation == "GET /audit" and isinstance(details, dict) and details.get("query") == "after"


def _integral_floats_as_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral_floats_as_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral_floats_as_ints(v) for v in value]
    return value


def _blank(text: str) -> str:
    """A message with its values blanked, so that failures differing only in values group together."""
    text = re.sub(r"unknown field .*", "unknown field …", text, flags=re.DOTALL)
    text = re.sub(r"`[^`]*`|'[^']*'|\"[^\"]*\"", "…", text)
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<id>", text)
    return re.sub(r"\d+", "N", text).removesuffix(" - at …")


def _reason(check: str, message: str, body: bytes) -> str:
    """What makes two failures of one check, operation and status the same finding. For a refused or accepted
    request, the server's error (code, and which field); for a response check, the check's first message line."""
    if check in ("positive_data_acceptance", "negative_data_rejection", "not_a_server_error"):
        try:
            err = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            if check == "negative_data_rejection":  # accepted: the reason is the invalid component
                return _blank(message.strip().splitlines()[-1])
            return "(no Parley error body)"
        details = err.get("details")
        if isinstance(details, list) and details and isinstance(details[0], dict):
            d = details[0]
            where = d.get("key") or d.get("source") or ""
            return f"{err.get('code')}: {where} {_blank(str(d.get('message', '')))}".strip()
        if isinstance(details, dict) and details:
            named = (f"{k}={v}" if k in ("header", "query", "field") else k for k, v in sorted(details.items()))
            return f"{err.get('code')}: {', '.join(named)}"
        return f"{err.get('code')}: {_blank(str(err.get('message', '')))}"
    first = message.strip().splitlines()[0] if message.strip() else ""
    return _blank(first)


# -- Parley's own checks -----------------------------------------------------------------------------------------
def _header(response: schemathesis.Response, name: str) -> str:
    return (response.headers.get(name.lower()) or [""])[0]


@schemathesis.check
def parley_error_shape(ctx: Any, response: schemathesis.Response, case: Case) -> None:
    """Every 4xx and 5xx answers Parley's one error shape, with `status` equal to the HTTP status."""
    if response.status_code < 400:
        return
    ctype = _header(response, "content-type")
    if not ctype.startswith("application/json"):
        raise AssertionError(f"error content-type is {ctype!r}, not application/json")
    allowed = OPENAI_ERROR_KEYS if "openai" in (case.operation.tags or ()) else ERROR_KEYS
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"error body is not JSON: {response.content[:200]!r}") from None
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        shape = sorted(body) if isinstance(body, dict) else type(body).__name__
        raise AssertionError(f'error body is not {{"error": {{...}}}}: {shape}')
    err = body["error"]
    if not {"status", "code", "message"} <= set(err) <= allowed:
        raise AssertionError(f"error has keys {sorted(err)}, not status, code, message (and details)")
    if err["status"] != response.status_code or type(err["status"]) is not int:
        raise AssertionError(f"error.status {err['status']!r} is not the HTTP status {response.status_code}")
    if not (isinstance(err["code"], str) and err["code"] and isinstance(err["message"], str) and err["message"]):
        raise AssertionError("error.code and error.message must be non-empty strings")


@schemathesis.check
def parley_headers_documented(ctx: Any, response: schemathesis.Response, case: Case) -> None:
    """A header a client acts on (ETag, Location, Retry-After, WWW-Authenticate, Allow) is in the document for the
    response that carries it. (An undocumented status is status_code_conformance's finding, not this one's.)"""
    if case.method.upper() != case.operation.method.upper():
        return  # an OPTIONS probe of unsupported_method's: its answer is not this operation's
    responses = case.operation.definition.raw.get("responses", {})
    documented = responses.get(str(response.status_code)) or responses.get(f"{response.status_code // 100}XX")
    if documented is None:
        return
    declared = {name.lower() for name in (documented.get("headers") or {})}
    missing = [name for name in DOCUMENTED_HEADERS if name in response.headers and name not in declared]
    if missing:
        raise AssertionError(f"{response.status_code} sends {', '.join(missing)}, not declared in its `headers`")


OWNER: dict[str, str] = {}
"""Real session id → the tenant that created it (filled by `seeded`)."""


def tenant_of(headers: Any) -> str | None:
    """The tenant whose key a request carried (Authorization wins over X-Auth-Key, as in the API)."""
    auth = headers.get("Authorization") or ""
    key = auth.partition(" ")[2].strip() if auth else (headers.get("X-Auth-Key") or "")
    return next((t for t, k in TENANTS.items() if k == key), None)


@schemathesis.check
def tenant_isolation(ctx: Any, response: schemathesis.Response, case: Case) -> None:
    """A real session of another tenant is invisible: never a success, never its state (a 409, or a 412 that names
    its version). Refusing the request for its own faults first (400, 422) reveals nothing and is fine."""
    owner = OWNER.get((case.path_parameters or {}).get("session_id", ""))
    tenant = tenant_of(response.request.headers)
    if not owner or not tenant or owner == tenant or case.method.upper() != case.operation.method.upper():
        return
    leaked = response.status_code < 400 or response.status_code == 409
    if response.status_code == 412:
        try:
            leaked = "version" in (json.loads(response.content)["error"].get("details") or {})
        except (ValueError, KeyError, TypeError, AttributeError):
            leaked = True
    if leaked:
        raise AssertionError(f"tenant {tenant} got {response.status_code}, not 404, for a session of tenant {owner}")


FINISHED_JOBS: set[str] = set()
"""Chat jobs that ended before fuzzing (filled by `seeded`)."""


@schemathesis.check
def finished_streams_end(ctx: Any, response: schemathesis.Response, case: Case) -> None:
    """The event stream of a job that has ended ends too (with `[DONE]`), whatever `Last-Event-ID` resumes it."""
    job = (case.path_parameters or {}).get("job_id")
    if job in FINISHED_JOBS and response.status_code == 200 and response.stream_cut_short:
        raise AssertionError(f"the stream of finished job {job} did not end within the request timeout")


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    unsupported_method,
    positive_data_acceptance,
    negative_data_rejection,
    parley_error_shape,
    parley_headers_documented,
    tenant_isolation,
    finished_streams_end,
]


# -- the stack and its real resources ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # no webhook deliverer: a subscription the fuzzer makes to a public host must never be sent to
    env = {
        "PARLEY_CHAT_WAIT_S": str(CHAT_WAIT_S),
        "PARLEY_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "PARLEY_WEBHOOK_POLL_S": "0",
    }
    with running_stack(tmp_path_factory.mktemp("e2e-fuzz"), env) as stack:
        yield stack


@dataclass
class Seeded:
    sessions: dict[str, list[str]] = field(default_factory=dict)
    """tenant → its live sessions (with messages, tools, chat jobs): path ids for every operation but PUT, PATCH and
    DELETE, which get sessions of their own, so these keep their settings (budget, tools) and stay alive."""
    patched: dict[str, list[str]] = field(default_factory=dict)
    """tenant → sessions only PUT and PATCH get."""
    doomed: dict[str, list[str]] = field(default_factory=dict)
    """tenant → sessions only DELETE gets."""
    deleted: dict[str, str] = field(default_factory=dict)
    """tenant → one of its sessions, deleted before fuzzing."""
    jobs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    """tenant → (session id, job id) of its finished chat jobs: an answer, a tool call, a failure."""


def _create(c: httpx.Client, body: dict[str, Any], headers: dict[str, str]) -> str:
    resp = c.post("/sessions", json=body, headers=headers)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


FINISHED = ("succeeded", "failed", "cancelled")


def _chat(c: httpx.Client, sid: str, content: str, headers: dict[str, str]) -> str:
    body = {"messages": [{"role": "user", "content": content}]}
    resp = c.post(f"/sessions/{sid}/chat", json=body, headers={**headers, "Prefer": "respond-async"})
    assert resp.status_code == 202, resp.text
    job = resp.json()["id"]
    deadline = time.monotonic() + 15
    while c.get(f"/sessions/{sid}/chats/{job}", headers=headers).json()["status"] not in FINISHED:
        assert time.monotonic() < deadline, f"chat {job} did not finish"
        time.sleep(0.05)
    return job


@pytest.fixture(scope="module")
def seeded(stack: Stack) -> Seeded:
    seed = Seeded()
    with httpx.Client(base_url=stack.api.url, timeout=15) as c:
        for tenant, headers in (("acme", ACME), ("globex", GLOBEX)):
            rich = _create(
                c,
                {
                    "agent_id": "fuzz",
                    "user_id": "u-1",
                    "situation": "You are a support agent.",
                    "token_budget": 4000,
                    "context_overflow": "truncate",
                    "tools": [tool("lookup_order")],
                    "metadata": {"plan": "pro"},
                },
                headers,
            )
            for role, content in (("user", "Where is my order?"), ("assistant", "One moment.")):
                body = {"role": role, "content": content}
                assert c.post(f"/sessions/{rich}/messages", json=body, headers=headers).status_code == 201
            answered = _chat(c, rich, "Hi, where is my parcel?", headers)
            called = _chat(c, rich, "call lookup_order 1234", headers)  # leaves an open tool call
            plain = _create(c, {}, headers)
            tight = _create(c, {"token_budget": 1, "situation": "A situation longer than one token."}, headers)
            failed = _chat(c, tight, "hello", headers)  # token_budget_exceeded
            gone = _create(c, {"agent_id": "gone"}, headers)
            assert c.delete(f"/sessions/{gone}", headers=headers).status_code == 202
            seed.sessions[tenant] = [rich, plain, tight]
            seed.patched[tenant] = [
                _create(c, {"agent_id": f"patched-{i}", "tools": [tool("lookup_order")]}, headers) for i in range(3)
            ]
            seed.doomed[tenant] = [_create(c, {"agent_id": f"doomed-{i}"}, headers) for i in range(6)]
            seed.deleted[tenant] = gone
            seed.jobs[tenant] = [(rich, answered), (rich, called), (tight, failed)]
            FINISHED_JOBS.update((answered, called, failed))
            for sid in (*seed.sessions[tenant], *seed.patched[tenant], *seed.doomed[tenant], gone):
                OWNER[sid] = tenant
    return seed


# -- the document, as the API serves it, once per tenant ---------------------------------------------------------
@pytest.fixture(scope="module")
def findings() -> Findings:
    return Findings()


@pytest.fixture(scope="module", params=list(TENANT_AUTH))
def tenant(request: pytest.FixtureRequest) -> str:
    return request.param


def _resolve(schema: Any, doc: dict[str, Any]) -> Any:
    while isinstance(schema, dict) and "$ref" in schema:
        node: Any = doc
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def _is_object(schema: dict[str, Any]) -> bool:
    return "properties" in schema or "additionalProperties" in schema


def _type_enum(schema: dict[str, Any]) -> list[Any]:
    """The values an object schema allows for its `type` property (`enum` or `const`)."""
    prop = schema.get("properties", {}).get("type", {})
    return prop.get("enum") or ([prop["const"]] if "const" in prop else [])


def _documented_only(value: Any, schema: Any, doc: dict[str, Any], depth: int = 0) -> Any:
    """`value` without the object fields its schema does not declare (where it allows no others)."""
    schema = _resolve(schema, doc)
    if depth > 20 or not isinstance(schema, dict):
        return value
    alternatives = [_resolve(s, doc) for s in schema.get("oneOf", []) + schema.get("anyOf", [])]
    if isinstance(value, dict):
        candidates = [s for s in [schema, *alternatives] if isinstance(s, dict) and _is_object(s)]
        # several object alternatives (content parts): the one whose `type` property names the value's `type`
        match = next((s for s in candidates if value.get("type") in _type_enum(s)), None)
        chosen = match or next(iter(candidates), None)
        if chosen is None or chosen.get("additionalProperties", False) is not False:
            return value
        props = chosen.get("properties", {})
        return {k: _documented_only(v, props[k], doc, depth + 1) for k, v in value.items() if k in props}
    if isinstance(value, list):
        items = next((s["items"] for s in [schema, *alternatives] if isinstance(s, dict) and "items" in s), None)
        return [_documented_only(v, items, doc, depth + 1) for v in value] if items is not None else value
    return value


@pytest.fixture(scope="module")
def api_schema(stack: Stack, seeded: Seeded, tenant: str, findings: Findings) -> schemathesis.BaseSchema:
    url = f"{stack.api.url}/schema/openapi.json"
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED + list(TENANT_AUTH).index(tenant),  # a seed per tenant: the two runs try different inputs
            "headers": {**TENANT_AUTH[tenant], "Accept": "application/json"},
            "request-timeout": REQUEST_TIMEOUT_S,
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "no-shrink": True,  # every failure is recorded as found; shrinking would only re-send requests
                "database": "none",  # nothing replayed from earlier runs: each run sends the same requests
                "with-security-parameters": False,  # always the tenant's key (unauthenticated: test_directed_probes)
            },
            "phases": {"stateful": {"enabled": False}},  # state is seeded instead (see `seeded`)
            "checks": {
                "positive_data_acceptance": {"expected-statuses": STATE_DEPENDENT},
                "negative_data_rejection": {"expected-statuses": REFUSALS},
            },
            "suppress-health-check": ["too_slow"],  # timing, not the contract: a slow CI machine must not fail it
            "output": {"sanitization": {"enabled": False}},  # test keys stay in the curls: they reproduce as shown
        }
    )
    schema = schemathesis.openapi.from_url(url, config=config)
    doc = httpx.get(url).json()

    def mostly_own(pools: dict[str, list[Any]]) -> list[Any]:
        return [item for t, pool in pools.items() for item in pool * (3 if t == tenant else 1)]

    deleted = list(seeded.deleted.values())
    pools = {
        "DELETE": mostly_own(seeded.doomed) + deleted,
        "PUT": mostly_own(seeded.patched) + deleted,
        "PATCH": mostly_own(seeded.patched) + deleted,
        "*": mostly_own(seeded.sessions) + deleted,
    }
    jobs = mostly_own(seeded.jobs)

    def real_ids(method: str, path_parameters: dict[str, Any], pick: Any) -> dict[str, Any]:
        if "job_id" in path_parameters:
            sid, job = pick(jobs)
            return {**path_parameters, "session_id": sid, "job_id": job}
        return {**path_parameters, "session_id": pick(pools.get(method, pools["*"]))}

    @schema.hook
    def flatmap_path_parameters(ctx: schemathesis.HookContext, path_parameters: Any) -> st.SearchStrategy:
        """Fuzzing: half of the cases keep the generated ids, half get real ones."""
        if not isinstance(path_parameters, dict) or "session_id" not in path_parameters or ctx.operation is None:
            return st.just(path_parameters)
        method = ctx.operation.method.upper()
        real = st.randoms(use_true_random=False).map(lambda r: real_ids(method, path_parameters, r.choice))
        return st.one_of(st.just(path_parameters), real)

    coverage_counter: dict[str, Iterator[int]] = {}

    @schema.hook
    def map_case(ctx: schemathesis.HookContext, case: Case) -> Case:
        """Whole-number floats are sent as integers: JSON Schema counts `100.0` as an integer, Parley's decoder (a JSON
        integer is written without a point) does not, and no schema can say so. Coverage phase (explicit cases, no
        Hypothesis draws): every other case gets real ids, in turn."""
        if isinstance(case.body, (dict, list)):
            case.body = _integral_floats_as_ints(case.body)
        if case.meta is None or case.meta.phase.name.value != "coverage" or not case.path_parameters:
            return case
        if "session_id" not in case.path_parameters:
            return case
        n = next(coverage_counter.setdefault(case.operation.label, itertools.count()))
        if n % 2:
            case.path_parameters = real_ids(case.method.upper(), case.path_parameters, lambda p: p[(n // 2) % len(p)])
        return case

    @schema.hook
    def flatmap_case(ctx: schemathesis.HookContext, case: Case) -> st.SearchStrategy:
        """Fuzzing, positive: half of the JSON bodies with only their documented fields."""
        if case.meta is None or not case.meta.generation.mode.is_positive or not isinstance(case.body, dict):
            return st.just(case)
        raw = case.operation.definition.raw.get("requestBody", {}).get("content", {}).get("application/json")
        if raw is None:
            return st.just(case)
        trimmed = _documented_only(case.body, raw.get("schema"), doc)
        if trimmed == case.body:
            return st.just(case)

        def with_body(body: Any) -> Case:
            case.body = body
            return case

        return st.sampled_from([case.body, trimmed]).map(with_body)

    @schema.hook
    def after_validate(
        ctx: schemathesis.HookContext, case: Case, response: schemathesis.Response, results: list
    ) -> None:
        for result in results:
            if result.failure is not None:
                findings.add(
                    tenant,
                    case.operation.label,
                    result.name,
                    response.status_code,
                    result.failure.title,
                    result.failure.message,
                    _curl(case),
                    response.content,
                )

    return schema


def _curl(case: Case, headers: dict[str, str] | None = None) -> str:
    curl = case.as_curl_command(headers=headers).replace("curl -X ", "curl -si -X ", 1)
    return curl if len(curl) < 2000 else f"{curl[:300]} …({len(curl)} characters)"


def _send(case: Case, tenant: str, findings: Findings, **kwargs: Any) -> schemathesis.Response | None:
    """Send a case and check its response; failures land in `findings` (the `after_validate` hook)."""
    try:
        response = case.call(**kwargs)
    except requests.RequestException as e:  # no complete answer within REQUEST_TIMEOUT_S
        curl = _curl(case, kwargs.get("headers"))
        findings.add(tenant, case.operation.label, "request_deadline", None, type(e).__name__, str(e)[:300], curl, b"")
        return None
    findings.response(case.operation.label, response.status_code)
    try:
        case.validate_response(response, checks=CHECKS, headers=kwargs.get("headers"))
    except FailureGroup:
        pass
    return response


if pytest.version_tuple >= (9, 2) and not hasattr(pytest.Function, "_nodeid"):
    # schemathesis 4.32 (`from_fixture`) reads and renames `item._nodeid`, only to label each operation's subtest
    # in reports; pytest 9.2 keeps the id in `item._id` and has no `_nodeid` (AttributeError). Reading it gives the
    # id; the rename is dropped (each subtest is still labelled with its operation). Drop this once schemathesis
    # supports pytest 9.2.
    pytest.Function._nodeid = property(lambda item: item.nodeid, lambda item, value: None)  # type: ignore[attr-defined]

_repeated = _jsonschema_strategy._repeated


def _repeated_or_nothing(placement: Any, ctx: Any, *, unique: bool) -> Any:
    """schemathesis 4.32's array strategy raises `InvalidSchema: Cannot generate an array with N demanded elements`
    for some layouts of a negated array schema (Hypothesis refuses the `st.lists` it builds), which fails the whole
    operation's generation, no request sent: seen on the chat body with one seed (2026-12-03), then on the schedules
    body with the seed that had avoided it, in one full-suite run of two (2026-12-04: it also depends on what the
    seeded sessions' ids make it draw, so no seed avoids it for good). Drawing nothing for that layout instead is
    what the same function does for a layout it knows cannot be met, so the generator goes on with the schema's
    other layouts and branches. Drop this once schemathesis fixes it."""
    try:
        return _repeated(placement, ctx, unique=unique)
    except InvalidSchema:
        return st.nothing()


_jsonschema_strategy._repeated = _repeated_or_nothing

lazy_schema = schemathesis.pytest.from_fixture("api_schema")


@lazy_schema.parametrize()
def test_openapi_contract(case: Case, tenant: str, findings: Findings) -> None:
    """Each generated case is sent and its response checked. Failures are recorded rather than raised, so that
    every case of every operation runs; `test_no_contract_violations` reports them all at once."""
    _send(case, tenant, findings)


# -- requests the generated cases do not make --------------------------------------------------------------------
def test_directed_probes(
    stack: Stack, api_schema: schemathesis.BaseSchema, tenant: str, seeded: Seeded, findings: Findings
) -> None:
    """A few requests generation cannot or should not produce, through the same checks: no key or an unknown key
    (generation always sends the tenant's), a body that is not JSON or not `application/json`, a body over
    PARLEY_MAX_BODY_BYTES, `Accept: text/event-stream` on the log (on a deleted session, whose stream ends), a
    finished job's stream resumed after its end; and on a fresh session (fuzzing changed the seeded ones' budgets and
    tools) the successes generation rarely reaches: a message, a PATCH, a queued, a synchronous and a streamed chat,
    and a completion and a streamed one."""
    auth = TENANT_AUTH[tenant]
    rich = seeded.sessions[tenant][0]
    with httpx.Client(base_url=stack.api.url, timeout=15) as c:
        fresh = _create(c, {"situation": "You are a support agent."}, auth)
    OWNER[fresh] = tenant
    messages = {"messages": [{"role": "user", "content": "hello"}]}
    job = seeded.jobs[tenant][0]

    def op(method: str, path: str) -> Any:
        return api_schema[path][method]

    def json_case(method: str, path: str, body: Any, sid: str | None = None, headers: dict | None = None) -> Case:
        return op(method, path).Case(
            path_parameters={"session_id": sid} if sid else None,
            headers={**auth, **(headers or {})},
            body=body,
            media_type="application/json",
        )

    probes: list[tuple[Case, dict[str, Any]]] = [
        (op("GET", "/sessions").Case(headers={"Accept": "application/json"}), {}),
        (op("GET", "/sessions").Case(headers={"Authorization": "Bearer not-a-key"}), {}),
        (
            op("GET", "/sessions/{session_id}").Case(
                path_parameters={"session_id": rich}, headers={"X-Auth-Key": "not-a-key"}
            ),
            {},
        ),
        (op("POST", "/sessions").Case(headers={**auth, "Content-Type": "application/json"}), {"data": b'{"agent": '}),
        (op("POST", "/sessions").Case(headers={**auth, "Content-Type": "text/plain"}), {"data": b"{}"}),
        (
            json_case(
                "POST", "/sessions/{session_id}/messages", {"role": "user", "content": "x" * MAX_BODY_BYTES}, rich
            ),
            {},
        ),
        (json_case("POST", "/sessions", {}, headers={"Idempotency-Key": ""}), {}),
        (
            op("GET", "/sessions/{session_id}").Case(
                path_parameters={"session_id": rich}, query={"version": 0}, headers=auth
            ),
            {},
        ),
        (
            op("GET", "/sessions/{session_id}/events").Case(
                path_parameters={"session_id": seeded.deleted[tenant]}, headers={**auth, "Accept": "text/event-stream"}
            ),
            {},
        ),
        (
            op(
                "GET", "/sessions/{session_id}/events"
            ).Case(  # resumed after SessionDeleted (version 2): nothing follows
                path_parameters={"session_id": seeded.deleted[tenant]},
                headers={**auth, "Accept": "text/event-stream", "Last-Event-ID": "2"},
            ),
            {},
        ),
        (
            op("GET", "/sessions/{session_id}/chats/{job_id}/stream").Case(  # resumed after a finished job's last event
                path_parameters={"session_id": job[0], "job_id": job[1]},
                headers={**auth, "Last-Event-ID": "18446744073709551615-0"},
            ),
            {"timeout": 2},
        ),
        (json_case("POST", "/sessions/{session_id}/messages", {"role": "user", "content": "hi"}, fresh), {}),
        (json_case("PATCH", "/sessions/{session_id}", {"agent_id": "probe"}, fresh), {}),
        (json_case("POST", "/sessions/{session_id}/chat", messages, fresh, {"Prefer": "respond-async"}), {}),
        (json_case("POST", "/sessions/{session_id}/chat", messages, fresh), {}),
        (json_case("POST", "/sessions/{session_id}/chat", {**messages, "stream": True}, fresh), {}),
        (json_case("POST", "/sessions/{session_id}/chat/completions", messages, fresh), {}),
        (json_case("POST", "/sessions/{session_id}/chat/completions", {**messages, "stream": True}, fresh), {}),
        (
            op("GET", "/sessions/{session_id}/chats/{job_id}").Case(
                path_parameters={"session_id": rich, "job_id": unknown_id()}, headers=auth
            ),
            {},
        ),
    ]
    for case, kwargs in probes:
        _send(case, tenant, findings, **kwargs)


# -- the report ----------------------------------------------------------------------------------------------------
TRACEBACK = re.compile(r"^Traceback \(most recent call last\):\n(?:[ \t].*\n)+\S.*$", re.MULTILINE)


def _tracebacks(log_path: Path) -> list[str]:
    """The API process's logged tracebacks, one per distinct exception line."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    distinct: dict[str, str] = {}
    for match in TRACEBACK.finditer(text):
        distinct.setdefault(match.group().splitlines()[-1], match.group())
    return list(distinct.values())


def _report(found: Findings, tracebacks: list[str]) -> str:
    lines = [
        (
            f"{len(found.by_key)} distinct contract violations in {found.cases} checked responses ({found.state_refusals}"
            f" valid requests refused for the state, not counted: {', '.join(sorted(STATE_DEPENDENT_CODES))})"
        )
    ]
    order = sorted(found.by_key.values(), key=lambda f: (f.operation.split(" ", 1)[1], f.operation, f.check, f.reason))
    for f in order:
        tenants = "/".join(sorted(f.tenants))
        lines += ["", f"[{f.operation}] {f.check}, HTTP {f.status}: {f.reason} (x{f.count}, {tenants})"]
        lines += ["    " + line for line in f.message.strip().splitlines()[:14]]
        lines.append(f"    $ {f.curl}")
        if f.response:
            lines.append(f"    -> {f.response[:300]}")
    if tracebacks:
        lines += ["", f"{len(tracebacks)} distinct tracebacks in the API log:", *tracebacks]
    return "\n".join(lines)


def test_no_contract_violations(request: pytest.FixtureRequest, findings: Findings) -> None:
    """Last in the module: all violations the cases above found, grouped, and the API's tracebacks."""
    if findings.cases == 0:
        pytest.skip("nothing was fuzzed: run the whole module, the cases above record what this test reports")
    tracebacks = _tracebacks(request.getfixturevalue("stack").api.log_path)
    if out := os.environ.get("PARLEY_FUZZ_REPORT"):
        Path(out).write_text(
            json.dumps(
                {
                    "cases": findings.cases,
                    "statuses": {op: dict(sorted(s.items())) for op, s in sorted(findings.statuses.items())},
                    "findings": [{**vars(f), "tenants": sorted(f.tenants)} for f in findings.by_key.values()],
                    "tracebacks": tracebacks,
                },
                indent=1,
            )
        )
    if findings.by_key or tracebacks:
        pytest.fail(_report(findings, tracebacks), pytrace=False)
