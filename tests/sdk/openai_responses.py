"""The Responses API through the official, unmodified `openai` package: a plain
response, a streamed one (the SDK's stream helper and raw events), a tool loop that
answers a forced call with `function_call_output`, a second turn through
`previous_response_id` that reads its first turn from the session cache, JSON-schema
output, retrieve and delete.

Usage: python3 tests/sdk/openai_responses.py http://127.0.0.1:PORT
Exits non-zero (with a traceback) on any wrong shape.
"""
import json
import sys

import openai
from openai.types.responses import Response, ResponseFunctionToolCall, ResponseOutputMessage

base = sys.argv[1].rstrip("/") + "/v1"
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
model = client.models.list().data[0].id

# Plain: typed object, output_text, usage with cached tokens.
r1 = client.responses.create(
    model=model,
    instructions="You are a helpful assistant. Answer briefly.",
    input="What is the capital of France?",
    max_output_tokens=24,
    temperature=0,
)
assert isinstance(r1, Response), type(r1)
assert r1.id.startswith("resp_"), r1.id
assert r1.object == "response" and r1.status in ("completed", "incomplete"), r1
assert isinstance(r1.output[0], ResponseOutputMessage), r1.output
assert r1.output[0].id.startswith("msg_")
assert r1.output_text and r1.output_text == r1.output[0].content[0].text, r1
assert r1.usage.input_tokens > 10 and r1.usage.output_tokens > 0, r1.usage
assert r1.usage.input_tokens_details.cached_tokens == 0, r1.usage

# Turn 2 through previous_response_id: the first turn comes from the session cache.
r2 = client.responses.create(
    model=model,
    instructions="You are a helpful assistant. Answer briefly.",
    input="And the capital of Italy?",
    previous_response_id=r1.id,
    max_output_tokens=24,
    temperature=0,
)
assert r2.previous_response_id == r1.id
cached = r2.usage.input_tokens_details.cached_tokens
assert cached >= 0.9 * r1.usage.input_tokens, (cached, r1.usage, r2.usage)
assert r2.usage.input_tokens > r1.usage.input_tokens + r1.usage.output_tokens, r2.usage
print(f"turn 2 cached {cached} of {r2.usage.input_tokens} (turn 1 read {r1.usage.input_tokens})")

# Retrieve, then delete: gone for GET and for chaining.
got = client.responses.retrieve(r2.id)
assert got.id == r2.id and got.output_text == r2.output_text, got
client.responses.delete(r2.id)
try:
    client.responses.retrieve(r2.id)
    raise AssertionError("a deleted response is still there")
except openai.NotFoundError as e:
    assert e.body["code"] == "not_found" or e.status_code == 404, e
try:
    client.responses.create(model=model, input="x", previous_response_id=r2.id)
    raise AssertionError("chained onto a deleted response")
except openai.NotFoundError as e:
    assert e.status_code == 404
# The turn it continued is still there and still chains.
r2b = client.responses.create(
    model=model,
    instructions="You are a helpful assistant. Answer briefly.",
    input="And of Spain?",
    previous_response_id=r1.id,
    max_output_tokens=8,
    temperature=0,
)
assert r2b.usage.input_tokens_details.cached_tokens >= 0.9 * r1.usage.input_tokens, r2b.usage

# Streaming with the SDK's helper: the official event sequence, numbered.
seen = []
with client.responses.stream(
    model=model, input="Say hello to the world.", max_output_tokens=64, temperature=0
) as stream:
    for event in stream:
        seen.append(event.type)
    final = stream.get_final_response()
assert seen[:4] == [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
], seen
assert "response.output_text.delta" in seen and "response.output_text.done" in seen, seen
assert seen[-1] == "response.completed", seen
assert final.output_text, final
deltas = []
for event in client.responses.create(
    model=model, input="Say hello to the world.", max_output_tokens=64, temperature=0, stream=True
):
    if event.type == "response.output_text.delta":
        deltas.append(event.delta)
    last = event
assert last.type == "response.completed" and "".join(deltas) == last.response.output_text
assert last.response.output_text == final.output_text, (last.response.output_text, final.output_text)

# A tool loop: a forced call, its result as function_call_output, then an answer.
tools = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    }
]
history = [{"role": "user", "content": "What is the weather in Paris?"}]
call_resp = client.responses.create(
    model=model,
    input=history,
    tools=tools,
    tool_choice="required",
    parallel_tool_calls=False,
    max_output_tokens=60,
    temperature=0,
)
calls = [o for o in call_resp.output if o.type == "function_call"]
assert len(calls) == 1 and isinstance(calls[0], ResponseFunctionToolCall), call_resp.output
call = calls[0]
assert call.name == "get_weather" and call.call_id.startswith("call_") and call.id.startswith("fc_")
args = json.loads(call.arguments)
assert isinstance(args["city"], str) and args["city"], args
history += [o.model_dump(exclude_none=True) for o in call_resp.output]
history.append(
    {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"sky": "sunny", "c": 21})}
)
answer = client.responses.create(
    model=model, input=history, tools=tools, parallel_tool_calls=False, max_output_tokens=30, temperature=0
)
assert answer.output and answer.status in ("completed", "incomplete"), answer

# The same loop through previous_response_id: only the tool output is sent.
chained = client.responses.create(
    model=model,
    previous_response_id=call_resp.id,
    input=[{"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"sky": "sunny", "c": 21})}],
    tools=tools,
    parallel_tool_calls=False,
    max_output_tokens=30,
    temperature=0,
)
said = lambda r: [o.model_dump(exclude={"id", "call_id"}) for o in r.output]
assert said(chained) == said(answer), (chained.output, answer.output)
assert chained.usage.input_tokens == answer.usage.input_tokens, (chained.usage, answer.usage)
assert chained.usage.input_tokens_details.cached_tokens >= call_resp.usage.input_tokens, chained.usage

# Streamed tool call: arguments arrive as deltas and add up.
arg_deltas, done = [], None
for event in client.responses.create(
    model=model, input=history[:1], tools=tools, tool_choice={"type": "function", "name": "get_weather"},
    max_output_tokens=60, temperature=0, stream=True, store=False,
):
    if event.type == "response.function_call_arguments.delta":
        arg_deltas.append(event.delta)
    if event.type == "response.function_call_arguments.done":
        done = event
    last = event
assert done is not None and "".join(arg_deltas) == done.arguments, (arg_deltas, done)
assert last.response.output[0].arguments == done.arguments
assert last.response.store is False
try:
    client.responses.retrieve(last.response.id)
    raise AssertionError("store: false was stored")
except openai.NotFoundError:
    pass

# JSON schema output through text.format.
schema = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
js = client.responses.create(
    model=model,
    input="Invent a person.",
    text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}},
    max_output_tokens=60,
    temperature=0,
)
person = json.loads(js.output_text)
assert isinstance(person["name"], str) and isinstance(person["age"], int), person
assert js.text.format.type == "json_schema"
obj = client.responses.create(
    model=model, input="Give me a JSON object.", text={"format": {"type": "json_object"}},
    max_output_tokens=40, temperature=0,
)
assert obj.output_text.lstrip().startswith("{"), obj.output_text
if obj.status == "completed":
    assert isinstance(json.loads(obj.output_text), dict), obj.output_text
else:
    assert obj.incomplete_details.reason == "max_output_tokens", obj

# Bad input: the OpenAI error shape, naming the field.
for bad, param in [
    ({"input": [{"type": "computer_call", "id": "x"}]}, "input[0].type"),
    ({"input": "x", "previous_response_id": "resp_does_not_exist"}, "previous_response_id"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "schema": schema}}}, "text.format.name"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
]:
    try:
        client.responses.create(model=model, **bad)
        raise AssertionError(f"accepted {bad}")
    except (openai.BadRequestError, openai.NotFoundError) as e:
        assert e.body["param"] == param, (bad, e.body)
        assert e.body["type"] == "invalid_request_error" and e.body["message"], e.body

print("openai responses ok")
