"""A zero-latency OpenAI-compatible server for the chat benchmark: answers at once, plain or streamed.

python -m tests.bench.zero_model --port N

`ZERO_MODEL_WORDS=N ZERO_MODEL_PACE_MS=M` in its environment: a streamed answer of N words, one chunk each, M ms
apart (a model that really streams: `profile_chat --paced`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import uvicorn

ANSWER = "Hello from the zero-latency model."
WORDS = int(os.environ.get("ZERO_MODEL_WORDS", "0"))
PACE_S = float(os.environ.get("ZERO_MODEL_PACE_MS", "0")) / 1000


def completion(model: str) -> bytes:
    return (
        b'{"id":"chatcmpl-zero","object":"chat.completion","created":%d,"model":"%s","choices":[{"index":0,'
        b'"message":{"role":"assistant","content":"%s"},"finish_reason":"stop","logprobs":null}],'
        b'"usage":{"prompt_tokens":10,"completion_tokens":8,"total_tokens":18}}'
    ) % (int(time.time()), model.encode(), ANSWER.encode())


def chunks(model: str) -> list[bytes]:
    head = b'{"id":"chatcmpl-zero","object":"chat.completion.chunk","created":%d,"model":"%s",' % (
        int(time.time()),
        model.encode(),
    )
    words = ANSWER.split(" ")
    if WORDS:
        words = (words * (WORDS // len(words) + 1))[:WORDS]
    out = [head + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}']
    out += [
        head + b'"choices":[{"index":0,"delta":{"content":"%s "},"finish_reason":null}]}' % w.encode() for w in words
    ]
    out += [head + b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}']
    out += [head + b'"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":8,"total_tokens":18}}']
    return [b"data: " + c + b"\n\n" for c in out] + [b"data: [DONE]\n\n"]


async def app(scope, receive, send) -> None:  # a bare ASGI app: the least a server can do
    if scope["type"] != "http":
        return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    stream = b'"stream":true' in body.replace(b" ", b"")
    model = "zero"
    if stream:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for c in chunks(model):
            await send({"type": "http.response.body", "body": c, "more_body": True})
            if PACE_S:
                await asyncio.sleep(PACE_S)
        await send({"type": "http.response.body", "body": b""})
    else:
        payload = completion(model)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools", access_log=False, log_level="warning"
    )


if __name__ == "__main__":
    main()
