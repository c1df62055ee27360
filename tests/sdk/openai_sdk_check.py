"""Drive candela with the official, unmodified `openai` Python package.

Usage: python3 tests/sdk/openai_sdk_check.py http://127.0.0.1:PORT
Exits non-zero (with a traceback) if any call fails or returns the wrong shape.
"""
import sys

import openai

base = sys.argv[1].rstrip("/") + "/v1"
client = openai.OpenAI(base_url=base, api_key="unused")

models = client.models.list()
model = models.data[0].id
assert model, models

chat = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=12,
    temperature=0,
)
text = chat.choices[0].message.content
assert isinstance(text, str) and text, chat
assert chat.choices[0].finish_reason in ("stop", "length"), chat
assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=12,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
parts, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert "".join(parts) == text, ("".join(parts), text)
assert finish == chat.choices[0].finish_reason
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens

comp = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
assert comp.choices[0].text, comp
assert comp.usage.completion_tokens >= 1

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("unknown model must fail")
except openai.NotFoundError as e:
    assert e.body["param"] == "model", e.body

try:
    client.chat.completions.create(model=model, messages=[])
    raise AssertionError("empty messages must fail")
except openai.BadRequestError as e:
    assert e.body["param"] == "messages", e.body

print("openai sdk ok:", repr(text))
