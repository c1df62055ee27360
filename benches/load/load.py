#!/usr/bin/env python3
"""Load test: many concurrent streaming clients against a running candela.

Each client loops for --duration seconds sending streaming chat requests: most on its
own named sessions (prompt_cache_key, the conversation growing turn by turn), some
anonymous, and a fraction hang up after a few chunks. A sampler reads /metrics every
second. Printed at the end: requests/s, outcomes by HTTP status, early disconnects,
TTFT p50/p95, and RSS and KV bytes before, during (peak) and after the load, and after
the sessions are deleted. Results also go to bench-out/load.json.

    python3 benches/load/load.py --url http://127.0.0.1:8080 --clients 64 --duration 60

Needs httpx (`pip install httpx`). Numbers are from whatever machine this
runs on; nothing here is a pass/fail test, except that the script exits 1 when a 5xx
was seen or KV bytes ever exceeded the budget.
"""

import argparse
import asyncio
import json
import os
import random
import statistics
import time

import httpx

TOPICS = ["lighthouses", "bees", "volcanoes", "chess", "rivers", "comets", "bread", "owls"]


def metric(text, name, labels=None):
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        rest = line[len(name):]
        if labels is None and rest.startswith(" "):
            return float(rest.split()[-1])
        if labels is not None and rest.startswith("{") and all(
            f'{k}="{v}"' in rest for k, v in labels.items()
        ):
            return float(rest.split()[-1])
    return None


async def vitals(client, url):
    t = (await client.get(f"{url}/metrics")).text
    return {
        "rss": metric(t, "process_resident_memory_bytes"),
        "kv_memory": metric(t, "candela_kv_cache_bytes", {"tier": "memory"}) or 0.0,
        "kv_budget": metric(t, "candela_kv_cache_budget_bytes"),
        "running": metric(t, "candela_requests_running"),
        "waiting": metric(t, "candela_requests_waiting"),
    }


async def one_request(client, url, messages, key, hang_up, stats, max_tokens):
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.7, "stream": True}
    if key:
        body["prompt_cache_key"] = key
    t0 = time.perf_counter()
    text = ""
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            stats["status"][r.status_code] = stats["status"].get(r.status_code, 0) + 1
            if r.status_code != 200:
                await r.aread()
                # Like a well-behaved SDK: back off as the server asks (429, 503).
                await asyncio.sleep(min(float(r.headers.get("retry-after", "1")), 5.0))
                return None
            chunks = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    stats["stream_errors"] += 1
                    return None
                delta = (ev.get("choices") or [{}])[0].get("delta", {})
                if delta.get("content"):
                    if chunks == 0:
                        stats["ttft"].append(time.perf_counter() - t0)
                    chunks += 1
                    text += delta["content"]
                    if hang_up and chunks >= 3:
                        stats["hung_up"] += 1
                        return None
        stats["completed"] += 1
        return text
    except httpx.HTTPError as e:
        stats["transport_errors"] += 1
        stats.setdefault("transport_error_kinds", {}).setdefault(type(e).__name__, 0)
        stats["transport_error_kinds"][type(e).__name__] += 1
        return None


async def client_loop(i, client, url, deadline, stats, args):
    rnd = random.Random(i)
    convs = {}
    while time.monotonic() < deadline:
        anonymous = rnd.random() < args.anonymous
        key = None if anonymous else f"load-{i}-{rnd.randrange(args.sessions_per_client)}"
        msgs = convs.get(key) or []
        if len(msgs) > 12:
            msgs = []
        topic = rnd.choice(TOPICS)
        msgs = msgs + [{"role": "user", "content": f"Tell me one short fact about {topic}."}]
        hang_up = rnd.random() < args.hang_up
        reply = await one_request(client, url, msgs, key, hang_up, stats, args.max_tokens)
        stats["requests"] += 1
        if key and reply is not None:
            convs[key] = msgs + [{"role": "assistant", "content": reply}]
        elif key:
            convs.pop(key, None)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--sessions-per-client", type=int, default=3)
    ap.add_argument("--anonymous", type=float, default=0.25, help="fraction without a session key")
    ap.add_argument("--hang-up", type=float, default=0.15, help="fraction that disconnect after 3 chunks")
    ap.add_argument("--settle", type=float, default=5, help="seconds to wait after the load")
    ap.add_argument("--out", default="bench-out/load.json")
    args = ap.parse_args()

    stats = {"status": {}, "ttft": [], "requests": 0, "completed": 0, "hung_up": 0,
             "stream_errors": 0, "transport_errors": 0}
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    timeout = httpx.Timeout(300.0, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        before = await vitals(client, args.url)
        samples = []
        done = asyncio.Event()

        async def sampler():
            while not done.is_set():
                samples.append(await vitals(client, args.url))
                try:
                    await asyncio.wait_for(done.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass

        s = asyncio.create_task(sampler())
        t0 = time.monotonic()
        deadline = t0 + args.duration
        await asyncio.gather(*(client_loop(i, client, args.url, deadline, stats, args)
                               for i in range(args.clients)))
        wall = time.monotonic() - t0
        done.set()
        await s
        await asyncio.sleep(args.settle)
        after = await vitals(client, args.url)
        # Delete this run's sessions; what is left of RSS is the server's own.
        sessions = (await client.get(f"{args.url}/v1/sessions")).json().get("data", [])
        for sess in sessions:
            if sess["id"].startswith("load-"):
                await client.delete(f"{args.url}/v1/sessions/{sess['id']}")
        await asyncio.sleep(args.settle)
        cleared = await vitals(client, args.url)

    ttft = sorted(stats["ttft"])
    q = lambda p: ttft[min(len(ttft) - 1, int(p * len(ttft)))] if ttft else float("nan")
    peak_rss = max((x["rss"] or 0) for x in samples) if samples else before["rss"]
    peak_kv = max(x["kv_memory"] for x in samples) if samples else 0
    budget = before["kv_budget"]
    mib = lambda b: f"{(b or 0) / 2**20:.1f} MiB"
    report = {
        "clients": args.clients, "duration_s": round(wall, 1), "requests": stats["requests"],
        "requests_per_s": round(stats["requests"] / wall, 2), "completed": stats["completed"],
        "hung_up": stats["hung_up"], "status": stats["status"],
        "stream_errors": stats["stream_errors"], "transport_errors": stats["transport_errors"],
        "transport_error_kinds": stats.get("transport_error_kinds", {}),
        "ttft_p50_s": round(q(0.5), 3), "ttft_p95_s": round(q(0.95), 3),
        "rss_before": before["rss"], "rss_peak": peak_rss, "rss_after": after["rss"],
        "rss_after_delete": cleared["rss"], "kv_before": before["kv_memory"], "kv_peak": peak_kv,
        "kv_after": after["kv_memory"], "kv_after_delete": cleared["kv_memory"], "kv_budget": budget,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"{args.clients} clients, {wall:.0f} s: {stats['requests']} requests "
          f"({report['requests_per_s']}/s), {stats['completed']} completed, {stats['hung_up']} hung up early")
    print(f"status: {stats['status']}  stream errors: {stats['stream_errors']}  "
          f"transport errors: {stats['transport_errors']} {report['transport_error_kinds']}")
    print(f"TTFT p50 {report['ttft_p50_s']} s, p95 {report['ttft_p95_s']} s")
    print(f"RSS: before {mib(before['rss'])}, peak {mib(peak_rss)}, after {mib(after['rss'])}, "
          f"after deleting sessions {mib(cleared['rss'])}")
    print(f"KV memory: before {mib(before['kv_memory'])}, peak {mib(peak_kv)}, after {mib(after['kv_memory'])}, "
          f"after deleting {mib(cleared['kv_memory'])}, budget {mib(budget)}")
    bad = any(int(k) >= 500 for k in stats["status"]) or (budget and peak_kv > budget)
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    asyncio.run(main())
