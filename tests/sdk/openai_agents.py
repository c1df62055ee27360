"""The OpenAI Agents SDK (`openai-agents`), unmodified, in its default Responses model
mode against candela: an agent with a function tool runs to a final output. With a
135M model the first turn is forced to call the tool (`tool_choice="required"`); the
SDK then resets the tool choice and the model answers from the tool's result.

Usage: python3 tests/sdk/openai_agents.py http://127.0.0.1:PORT
Exits non-zero (with a traceback) on any failure.
"""
import asyncio
import sys

from agents import (
    Agent,
    ModelSettings,
    Runner,
    function_tool,
    set_default_openai_api,
    set_default_openai_client,
    set_tracing_disabled,
)
from agents.items import ToolCallItem, ToolCallOutputItem
from openai import AsyncOpenAI

base = sys.argv[1].rstrip("/") + "/v1"
set_default_openai_client(AsyncOpenAI(base_url=base, api_key="unused", max_retries=0), use_for_tracing=False)
set_default_openai_api("responses")
set_tracing_disabled(True)

calls = []


@function_tool
def get_weather(city: str) -> str:
    """Current weather for a city."""
    calls.append(city)
    return f"It is sunny and 21 degrees in {city}."


settings = ModelSettings(tool_choice="required", temperature=0, max_tokens=60, parallel_tool_calls=False)


async def main():
    # Stop at the tool's result: one forced call, the tool's output is the answer.
    stop = Agent(
        name="weather-stop",
        instructions="You answer weather questions with the get_weather tool.",
        model="default",
        tools=[get_weather],
        model_settings=settings,
        tool_use_behavior="stop_on_first_tool",
    )
    r = await Runner.run(stop, "What is the weather in Paris?", max_turns=3)
    assert len(calls) == 1 and calls[0], calls
    assert r.final_output == f"It is sunny and 21 degrees in {calls[0]}.", r.final_output
    assert r.raw_responses[0].output[0].type == "function_call", r.raw_responses[0]
    print(f"stop_on_first_tool: called get_weather({calls[0]!r}), final output {r.final_output!r}")

    # The full loop: forced call, the tool's output goes back as function_call_output,
    # the tool choice resets to auto and the model writes the final answer.
    loop = Agent(
        name="weather-loop",
        instructions="You answer weather questions with the get_weather tool.",
        model="default",
        tools=[get_weather],
        model_settings=settings,
        reset_tool_choice=True,
    )
    r = await Runner.run(loop, "What is the weather in Paris?", max_turns=4)
    kinds = [type(i).__name__ for i in r.new_items]
    assert any(isinstance(i, ToolCallItem) for i in r.new_items), kinds
    assert any(isinstance(i, ToolCallOutputItem) for i in r.new_items), kinds
    assert isinstance(r.final_output, str) and r.final_output.strip(), r.final_output
    assert len(r.raw_responses) >= 2, r.raw_responses
    second = r.raw_responses[-1]
    first = r.raw_responses[0]
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens, (first.usage, second.usage)
    print(f"tool loop: {kinds}, final output {r.final_output!r}")


asyncio.run(main())
print("openai agents ok")
