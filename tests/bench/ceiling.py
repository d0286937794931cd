"""The ceilings: bare litestar handlers on the same ASGI server, doing the least the real endpoint must.

P1: decode the same body with msgspec and do one XADD.  P2: one Redis GET of a pre-encoded value.
Run: python -m tests.bench.ceiling --port N --redis URL
"""

from __future__ import annotations

import argparse
import contextlib

import msgspec
import uvicorn
from litestar import Litestar, MediaType, Request, Response, get, post

from shared.adapters.redis.connect import connect
from shared.domain.wire import MessageCreate

_decode = msgspec.json.Decoder(MessageCreate).decode


def build(redis_url: str) -> Litestar:
    redis = connect(redis_url)  # the same client as Parley: hiredis parsing and packing

    @post("/c/{sid:str}/messages", status_code=201)
    async def append(request: Request, sid: str) -> Response[bytes]:
        body = await request.body()
        _decode(body)
        entry = await redis.xadd(f"ceiling:{{{sid}}}:log", {"d": body})
        return Response(content=b'{"id":"%s"}' % entry, media_type=MediaType.JSON, status_code=201)

    @get("/c/{sid:str}")
    async def read(sid: str) -> Response[bytes]:
        value = await redis.get(f"ceiling:{{{sid}}}:doc")
        return Response(content=value or b"null", media_type=MediaType.JSON)

    @contextlib.asynccontextmanager
    async def lifespan(_: Litestar):
        yield
        await redis.aclose()

    return Litestar([append, read], lifespan=[lifespan], openapi_config=None, logging_config=None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    args = parser.parse_args()
    uvicorn.run(
        build(args.redis),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
