"""The Python `openai` SDK's `chat.completions.parse()`: its parsed message (carrying `parsed`, `refusal`, …) appended
to the next request, as its docs show, must be accepted and stored once; and `models.retrieve`. (Plain `create`,
streams, tools and errors are tests/chat/test_openai_sdk.py.)"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.chat.conftest import Stack
from tests.clients.api import KEY, create, marker, stored
from tests.e2e.helpers import unknown_id
from tests.model_server import ModelServer


class Weather(BaseModel):
    city: str
    temp_c: int


@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")  # the SDK's own, dumping `parsed`
def test_parse_with_a_response_format_model_then_append(stack: Stack, c: httpx.Client, model: ModelServer) -> None:
    sid = create(c, situation="You report the weather as JSON.")
    bodies: list[dict[str, object]] = []  # what the SDK sends, to show it echoes `parsed`
    hooks = {"request": [lambda r: bodies.append(json.loads(r.read()))]}
    client = openai.OpenAI(
        base_url=f"{stack.url}/sessions/{sid}",
        api_key=KEY,
        max_retries=0,
        http_client=httpx.Client(timeout=30, event_hooks=hooks),
    )
    m = marker()
    model.control(reply=json.dumps({"city": f"Paris {m}", "temp_c": 21}))
    messages: list[object] = [
        {"role": "system", "content": "You report the weather as JSON."},
        {"role": "user", "content": "Weather in Paris?"},
    ]
    parsed = client.chat.completions.parse(model="gpt-4o-mini", messages=messages, response_format=Weather)  # type: ignore[arg-type]
    message = parsed.choices[0].message
    assert message.parsed == Weather(city=f"Paris {m}", temp_c=21)
    sent = model.requests(containing="Weather in Paris?")[-1]["body"]
    assert (
        sent["response_format"]["type"] == "json_schema" and sent["response_format"]["json_schema"]["name"] == "Weather"
    )
    model.control(reply=None)
    messages += [message, {"role": "user", "content": "And tomorrow?"}]  # the SDK's parsed message, as its docs do
    follow = client.chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
    assert follow.choices[0].message.content == "echo: And tomorrow?"
    resent = bodies[-1]["messages"][2]  # type: ignore[index]
    assert resent["parsed"] == {"city": f"Paris {m}", "temp_c": 21} and "refusal" in resent, resent
    echoed = model.requests(containing="And tomorrow?")[-1]["body"]["messages"]
    assert "parsed" not in echoed[2] and echoed[2]["content"] == message.content  # ignored, never passed on
    assert [(x["role"], x["content"]) for x in stored(c, sid)] == [
        ("user", "Weather in Paris?"),
        ("assistant", message.content),
        ("user", "And tomorrow?"),
        ("assistant", "echo: And tomorrow?"),
    ]


def test_models_retrieve(stack: Stack, c: httpx.Client) -> None:
    """Any model name: a completion passes any name on to the provider, so the session answers for each."""
    sid = create(c)
    client = openai.OpenAI(base_url=f"{stack.url}/sessions/{sid}", api_key=KEY, max_retries=0, timeout=30)
    got = client.models.retrieve("gpt-4o-mini")
    assert (
        got.id == "gpt-4o-mini" and got.object == "model" and got.owned_by == "parley" and isinstance(got.created, int)
    )
    assert client.models.retrieve("meta-llama/Llama-3.1-8B-Instruct").id == "meta-llama/Llama-3.1-8B-Instruct"
    elsewhere = openai.OpenAI(base_url=f"{stack.url}/sessions/{unknown_id()}", api_key=KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.NotFoundError):
        elsewhere.models.retrieve("gpt-4o-mini")
