"""A multi-turn tool loop through the official, unmodified `openai` package:
the model calls a tool, the tool's result goes back as a `tool` message, and the model
answers. Also checks streamed tool-call deltas through the SDK.

Usage: python3 tests/sdk/openai_tool_loop.py http://127.0.0.1:PORT [MODEL]
Exits non-zero (with a traceback) on any wrong shape.
"""
import json
import sys

import openai

base = sys.argv[1].rstrip("/") + "/v1"
client = openai.OpenAI(base_url=base, api_key="unused")
model = sys.argv[2] if len(sys.argv) > 2 else client.models.list().data[0].id

tools = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "minLength": 1, "maxLength": 40},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    }
]


def get_weather(city, unit):
    return {"city": city, "temperature": 21 if unit == "celsius" else 70, "unit": unit, "sky": "sunny"}


messages = [{"role": "user", "content": "What is the weather in Paris right now?"}]

# Turn 1: the model must call the tool.
r = client.chat.completions.create(
    model=model, messages=messages, tools=tools, tool_choice="required",
    parallel_tool_calls=False, max_tokens=120, temperature=0.3, seed=11,
)
choice = r.choices[0]
assert choice.finish_reason == "tool_calls", r
msg = choice.message
assert msg.content is None, r
assert msg.tool_calls and len(msg.tool_calls) == 1, r
call = msg.tool_calls[0]
assert call.type == "function" and call.id.startswith("call_"), call
assert call.function.name == "get_weather", call
args = json.loads(call.function.arguments)
assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit"), args
assert isinstance(args["city"], str) and 1 <= len(args["city"]) <= 40, args

# Turn 2: the tool result goes back; the model answers in text.
messages.append(msg.model_dump(exclude_none=True))
messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(get_weather(**args))})
r2 = client.chat.completions.create(
    model=model, messages=messages, tools=tools, tool_choice="none", max_tokens=60, temperature=0,
)
answer = r2.choices[0].message
assert answer.tool_calls is None and isinstance(answer.content, str) and answer.content.strip(), r2
assert r2.choices[0].finish_reason in ("stop", "length"), r2
# The call and its result reached the prompt: longer than the question alone.
alone = client.chat.completions.create(
    model=model, messages=messages[:1], tools=tools, tool_choice="none", max_tokens=1,
)
assert r2.usage.prompt_tokens > alone.usage.prompt_tokens + 20, (alone.usage, r2.usage)

# The same first turn, streamed: the SDK's deltas reassemble into the same call.
stream = client.chat.completions.create(
    model=model, messages=messages[:1], tools=tools, tool_choice="required",
    parallel_tool_calls=False, max_tokens=120, temperature=0.3, seed=11, stream=True,
)
name, arguments, ids, finish, pieces = None, "", set(), None, 0
for chunk in stream:
    for c in chunk.choices:
        for tc in c.delta.tool_calls or []:
            assert tc.index == 0, tc
            if tc.id:
                ids.add(tc.id)
            if tc.function and tc.function.name:
                assert name is None, "the name comes once"
                name = tc.function.name
            if tc.function and tc.function.arguments:
                assert name is not None, "the name comes before the arguments"
                arguments += tc.function.arguments
                pieces += 1
        if c.finish_reason:
            finish = c.finish_reason
assert finish == "tool_calls", finish
assert len(ids) == 1 and name == call.function.name, (ids, name)
assert json.loads(arguments) == args, (arguments, args)
# The arguments stream as they are generated, not in one piece at the end.
assert pieces > 1, pieces
# Same text as the whole response (same seed): the fragments are the model's own JSON.
assert arguments == call.function.arguments, (arguments, call.function.arguments)

print("tool loop ok:", call.function.name, args, "->", answer.content[:60].replace("\n", " "))
