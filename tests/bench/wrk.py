"""Closed-loop load with wrk: a Lua script spreads requests over many paths and prints a JSON summary."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import msgspec

LUA = r"""
local paths = {}
for line in io.lines("%(paths)s") do paths[#paths + 1] = line end
local method, body = "%(method)s", %(body)s
local headers = {["Authorization"] = "Bearer %(key)s", ["Content-Type"] = "application/json"}
local i = 0
request = function()
  i = i + 1
  return wrk.format(method, paths[(i %% #paths) + 1], headers, body)
end
local threads = {}
setup = function(thread) table.insert(threads, thread) end
failures = {}
response = function(status, hdrs, b)
  if status < 200 or status > 299 then
    local key = string.format("%%d %%s", status, (b and b:match('"code":"([%%w_]+)"')) or "")
    failures[key] = (failures[key] or 0) + 1
  end
end
done = function(summary, latency, requests)
  local e = summary.errors
  local parts = {}
  for _, kind in ipairs({"connect", "read", "write", "timeout"}) do  -- socket errors, by kind, as failures too
    if e[kind] > 0 then parts[#parts + 1] = string.format('"socket %%s":%%d', kind, e[kind]) end
  end
  for _, thread in ipairs(threads) do
    for k, n in pairs(thread:get("failures") or {}) do parts[#parts + 1] = string.format('"%%s":%%d', k, n) end
  end
  io.write(string.format('PARLEY_JSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,"errors":%%d,"failures":{%%s}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout + e.status, table.concat(parts, ",")))
end
"""


class LoadResult(msgspec.Struct, kw_only=True):
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    failures: dict[str, int] = {}
    """Non-2xx answers by status and error code (`503 overloaded`), as the open-loop generator counts them, and
    socket errors by kind (`socket read`: the connection closed or reset under a request)."""


def available() -> bool:
    return shutil.which("wrk") is not None


def run(
    base_url: str,
    paths: list[str],
    seconds: float,
    connections: int,
    key: str,
    method: str = "GET",
    body: bytes | None = None,
) -> LoadResult:
    with tempfile.TemporaryDirectory() as tmp:
        paths_file = Path(tmp) / "paths.txt"
        paths_file.write_text("\n".join(paths) + "\n")
        script = Path(tmp) / "script.lua"
        lua_body = "nil" if body is None else "[==[" + body.decode() + "]==]"
        script.write_text(LUA % {"paths": paths_file, "method": method, "body": lua_body, "key": key})
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "10s",
                "-s",
                str(script),
                base_url,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        ).stdout
    line = next(l for l in out.splitlines() if l.startswith("PARLEY_JSON "))
    raw = json.loads(line.removeprefix("PARLEY_JSON "))
    secs = raw["duration_us"] / 1e6
    return LoadResult(
        requests=raw["requests"],
        seconds=secs,
        rps=raw["requests"] / secs,
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        errors=raw["errors"],
        failures={k.strip(): n for k, n in raw.get("failures", {}).items()},
    )
