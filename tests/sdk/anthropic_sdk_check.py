"""Drive candela's Messages API with the official, unmodified `anthropic` Python package:
a plain message, the same message streamed through the SDK's stream helper, a stop
sequence, count_tokens, a forced tool_use -> tool_result loop (inputs validated against
the tool's input_schema with `jsonschema`, also streamed), a second turn of a session
named by Claude Code's `metadata.user_id` that reads >= 90% of its input from the
cache, and errors in Anthropic's shape.

Usage: python3 tests/sdk/anthropic_sdk_check.py http://127.0.0.1:PORT
Exits non-zero (with a traceback) on any wrong shape.
"""
import json
import sys
import urllib.request
import uuid

import anthropic
from jsonschema import Draft202012Validator

base = sys.argv[1].rstrip("/")
client = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0)
model = json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["id"]

question = [{"role": "user", "content": "What is the capital of France?"}]
# Sampling fields go in the body: newer SDKs no longer take them as arguments.
GREEDY = {"temperature": 0}


def total_input(u):
    return u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)


# Plain.
msg = client.messages.create(model=model, max_tokens=16, extra_body=GREEDY, messages=question)
assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_"), msg
assert msg.model == model, msg
assert len(msg.content) == 1 and msg.content[0].type == "text", msg
text = msg.content[0].text
assert text, msg
assert msg.stop_reason in ("end_turn", "max_tokens") and msg.stop_sequence is None, msg
assert msg.usage.output_tokens >= 1 and total_input(msg.usage) > 10, msg.usage

# Streamed: the same text, the same stop reason and usage, through the SDK's helper.
with client.messages.stream(model=model, max_tokens=16, extra_body=GREEDY, messages=question) as s:
    streamed = "".join(s.text_stream)
    final = s.get_final_message()
assert streamed == text, (streamed, text)
assert final.content[0].text == text, final
assert final.stop_reason == msg.stop_reason, final
assert final.usage.output_tokens == msg.usage.output_tokens, final.usage
assert total_input(final.usage) == total_input(msg.usage), (final.usage, msg.usage)

# count_tokens: the prompt the message was generated from.
counted = client.messages.count_tokens(model=model, messages=question)
assert counted.input_tokens == total_input(msg.usage), (counted, msg.usage)
long_system = "Answer briefly and precisely. " * 20
with_system = client.messages.count_tokens(model=model, system=long_system, messages=question)
assert with_system.input_tokens > counted.input_tokens + 60, (with_system, counted)

# A stop sequence from the middle of the greedy answer ends it there.
words = text.split()
if len(words) >= 3:
    stop = words[len(words) // 2]
    cut = client.messages.create(
        model=model, max_tokens=16, extra_body=GREEDY, messages=question, stop_sequences=[stop, "zzzz"]
    )
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop, cut
    assert cut.content[0].text == text[: text.index(stop)], (cut, text)

# A forced tool call: tool_use with a schema-valid input, then its tool_result.
schema = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
tools = [{"name": "get_weather", "description": "Current weather for a city", "input_schema": schema}]
ask = [{"role": "user", "content": "What is the weather in Paris right now?"}]
r = client.messages.create(
    model=model, max_tokens=120, extra_body={"temperature": 0.3}, messages=ask, tools=tools,
    tool_choice={"type": "tool", "name": "get_weather"},
)
assert r.stop_reason == "tool_use", r
uses = [b for b in r.content if b.type == "tool_use"]
assert len(uses) == 1, r
use = uses[0]
assert use.id.startswith("toolu_") and use.name == "get_weather", use
errors = [e.message for e in Draft202012Validator(schema).iter_errors(use.input)]
assert not errors, (use.input, errors)

result = {"city": use.input["city"], "temperature": 21, "unit": use.input["unit"], "sky": "sunny"}
loop = ask + [
    {"role": "assistant", "content": r.content},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": json.dumps(result)}]},
]
answer = client.messages.create(
    model=model, max_tokens=24, extra_body=GREEDY, messages=loop, tools=tools, tool_choice={"type": "none"}
)
assert answer.stop_reason in ("end_turn", "max_tokens"), answer
assert answer.content[0].type == "text" and answer.content[0].text, answer

# The forced call streamed: input_json_delta pieces that make the same kind of input.
with client.messages.stream(
    model=model, max_tokens=120, extra_body=GREEDY, messages=ask, tools=tools,
    tool_choice={"type": "any", "disable_parallel_tool_use": True},
) as s:
    kinds = [e.type for e in s]
    streamed_call = s.get_final_message()
assert streamed_call.stop_reason == "tool_use", streamed_call
assert "input_json" in kinds, kinds
calls = [b for b in streamed_call.content if b.type == "tool_use"]
assert len(calls) == 1, streamed_call
call = calls[0]
assert not list(Draft202012Validator(schema).iter_errors(call.input)), call.input

# A session named by Claude Code's metadata.user_id: the second turn reads >= 90% of
# its input from the cache.
session = str(uuid.uuid4())
user_id = f"user_{'ab' * 32}_account_{uuid.uuid4()}_session_{session}"
system = (
    "You are a careful assistant for a small bakery. You answer questions about opening hours, "
    "bread, cakes and pastries, prices and orders. Opening hours are 7am to 6pm from Tuesday to "
    "Saturday and 8am to 1pm on Sunday; the bakery is closed on Mondays. Sourdough costs 5 euros, "
    "a baguette 1.20 euros, croissants 1.50 euros each and a whole apple tart 18 euros. Orders for "
    "cakes need two days' notice and can be collected from 10am. Always answer in one short "
    "sentence and never invent products that are not on this list. Delivery is possible within "
    "five kilometres for orders above 30 euros, and costs 4 euros; it takes place between 11am and "
    "2pm. Gluten-free bread is baked on Fridays only and must be ordered the day before. Payment "
    "is by card or cash; vouchers bought in the shop are valid for one year. Large orders for "
    "weddings and parties are discussed in person with the head baker, who works mornings."
)
turn1 = [{"role": "user", "content": "When are you open on Sunday?"}]
first = client.messages.create(
    model=model, max_tokens=24, extra_body=GREEDY, system=system, messages=turn1, metadata={"user_id": user_id}
)
assert first.usage.cache_read_input_tokens == 0, first.usage
assert first.usage.cache_creation_input_tokens == total_input(first.usage), first.usage
turn2 = turn1 + [
    {"role": "assistant", "content": first.content[0].text},
    {"role": "user", "content": "And the price of a baguette?"},
]
second = client.messages.create(
    model=model, max_tokens=24, extra_body=GREEDY, system=system, messages=turn2, metadata={"user_id": user_id}
)
u = second.usage
assert u.cache_read_input_tokens >= 0.9 * total_input(u), u
assert u.input_tokens == 0 and u.cache_creation_input_tokens == total_input(u) - u.cache_read_input_tokens, u
info = json.load(urllib.request.urlopen(f"{base}/v1/sessions/{session}"))
assert info["tokens"] >= total_input(u), info

# Errors: Anthropic's shape, mapped to the SDK's exceptions.
try:
    client.messages.create(
        model=model, max_tokens=8,
        messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_nope", "content": "x"}]}],
    )
    raise AssertionError("a tool_result for an unknown tool_use_id must fail")
except anthropic.BadRequestError as e:
    assert e.body["type"] == "error" and e.body["error"]["type"] == "invalid_request_error", e.body
    assert "toolu_nope" in e.body["error"]["message"], e.body
try:
    client.messages.create(model="no-such-model", max_tokens=8, messages=question)
    raise AssertionError("unknown model must fail")
except anthropic.NotFoundError as e:
    assert e.body["error"]["type"] == "not_found_error", e.body

print(f"anthropic sdk ok ({anthropic.__version__}): {text!r}, second turn read "
      f"{u.cache_read_input_tokens}/{total_input(u)} from the cache")
