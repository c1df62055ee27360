"""Decode speed with and without grammar-constrained decoding, measured in the same run.

Usage: python3 benches/constrain_overhead.py http://127.0.0.1:8080 [--reps 3] [--tokens 128]

For each mode (plain text, response_format json_object, a json_schema, a forced tool
call) it times a 1-token request (prompt + first token; the prompt is then cached) and
a greedy completion of up to --tokens tokens, and takes decode tok/s = (tokens - 1) /
(full time - 1-token time). Modes alternate rep by rep so that load on a shared
machine hits them alike. Because the forward pass dominates and swings with machine
load, it also reads from /metrics, per mode, the forward time per token
(candela_decode_step_seconds), the inter-token latency, and the mask time
(candela_constraint_mask_seconds): the constraint's cost is what the inter-token
latency adds on top of the forward pass.
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


def stats():
    """(decode step sum, count, inter-token sum, count, mask sum, count) from /metrics."""
    text = urllib.request.urlopen(base + "/metrics").read().decode()

    def one(name):
        v = re.findall(r"^%s(?:\{[^}]*\})? (\S+)" % name, text, re.M)
        return sum(float(x) for x in v)

    return [one(n) for n in (
        "candela_decode_step_seconds_sum", "candela_decode_step_seconds_count",
        "candela_inter_token_latency_seconds_sum", "candela_inter_token_latency_seconds_count",
        "candela_constraint_mask_seconds_sum", "candela_constraint_mask_seconds_count")]


rows = {m: {"rate": [], "fwd": [], "itl": [], "mask": []} for m in modes}
for rep in range(a.reps):
    for m, extra in modes.items():
        t0 = time.perf_counter()
        stream(extra, 1)
        one = time.perf_counter() - t0
        s0 = stats()
        t0 = time.perf_counter()
        n, _ = stream(extra, a.tokens)
        dt = time.perf_counter() - t0
        d = [y - x for x, y in zip(s0, stats())]
        r = rows[m]
        r["rate"].append((n - 1) / max(dt - one, 1e-6))
        r["fwd"].append(d[0] / max(d[1], 1) * 1e3)
        r["itl"].append(d[2] / max(d[3], 1) * 1e3)
        r["mask"].append(d[4] / max(d[5], 1) * 1e3)
        print(f"rep {rep} {m:14s} {n:4d} tokens {r['rate'][-1]:6.1f} tok/s  forward {r['fwd'][-1]:6.2f} ms"
              f"  inter-token {r['itl'][-1]:6.2f} ms  mask {r['mask'][-1]:.3f} ms", flush=True)


def med(x):
    return sorted(x)[len(x) // 2]


print("\nmode            tok/s  forward ms/token  inter-token ms  outside forward ms  mask ms  mask/forward")
for m, r in rows.items():
    outside = [i - f for i, f in zip(r["itl"], r["fwd"])]
    share = [k / f for k, f in zip(r["mask"], r["fwd"])]
    print(f"{m:15s} {med(r['rate']):5.1f} {med(r['fwd']):17.2f} {med(r['itl']):15.2f} {med(outside):19.3f}"
          f" {med(r['mask']):8.3f} {100 * med(share):11.1f}%")
