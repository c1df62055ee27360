"""Decode speed with and without grammar-constrained decoding, measured in the same run.

Usage: python3 benches/constrain_overhead.py http://127.0.0.1:8080 [--reps 3] [--tokens 128]

For each mode (plain text, response_format json_object, a json_schema, a forced tool
call) it times a 1-token request (prompt + first token; the prompt is then cached) and
a greedy completion of up to --tokens tokens, and takes decode tok/s = (tokens - 1) /
(full time - 1-token time). Modes alternate rep by rep so that load on a shared
machine hits them alike. It also reads candela_constraint_mask_seconds from
/metrics for the mean time of one token mask.
"""
import argparse
import json
import re
import time
import urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("base")
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--tokens", type=int, default=128)
a = ap.parse_args()
base = a.base.rstrip("/")

schema = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "summary": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "year": {"type": "integer"},
    },
    "required": ["title", "summary", "tags", "year"],
    "additionalProperties": False,
}
tool = {"type": "function", "function": {"name": "save_note", "description": "Save a note",
        "parameters": {"type": "object", "properties": {"title": {"type": "string"}, "body": {"type": "string"}},
                       "required": ["title", "body"]}}}
prompt = [{"role": "user", "content": "Write a long description of a film you like, as JSON."}]
modes = {
    "plain": {},
    "json_object": {"response_format": {"type": "json_object"}},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "film", "schema": schema}}},
    "tool_required": {"tools": [tool], "tool_choice": "required", "parallel_tool_calls": False},
}


def stream(extra, max_tokens):
    body = {"messages": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    times, usage = [], None
    with urllib.request.urlopen(req) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            v = json.loads(line[6:])
            if v.get("usage"):
                usage = v["usage"]
            if v["choices"] and (v["choices"][0]["delta"].get("content") or v["choices"][0]["delta"].get("tool_calls")):
                times.append(time.perf_counter())
    n = usage["completion_tokens"]
    return n, times


def mask_stats():
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    s = re.search(r"^candela_constraint_mask_seconds_sum (\S+)", text, re.M)
    c = re.search(r"^candela_constraint_mask_seconds_count (\S+)", text, re.M)
    return float(s.group(1)) if s else 0.0, float(c.group(1)) if c else 0.0


rates = {m: [] for m in modes}
masks = {m: [] for m in modes}
for rep in range(a.reps):
    for m, extra in modes.items():
        t0 = time.perf_counter()
        stream(extra, 1)
        one = time.perf_counter() - t0
        s0, c0 = mask_stats()
        t0 = time.perf_counter()
        n, _ = stream(extra, a.tokens)
        dt = time.perf_counter() - t0
        s1, c1 = mask_stats()
        rates[m].append((n - 1) / max(dt - one, 1e-6))
        if c1 > c0:
            masks[m].append((s1 - s0) / (c1 - c0) * 1e3)
        print(f"rep {rep} {m:14s} {n:4d} tokens {rates[m][-1]:6.1f} tok/s", flush=True)
base_rate = sorted(rates["plain"])[len(rates["plain"]) // 2]
print("\nmode            median tok/s  vs plain  mean mask ms/token")
for m in modes:
    r = sorted(rates[m])[len(rates[m]) // 2]
    mk = sum(masks[m]) / len(masks[m]) if masks[m] else 0.0
    print(f"{m:15s} {r:12.1f} {r / base_rate:9.2f} {mk:19.3f}")
