#!/usr/bin/env python3
"""Aggregate decode over HTTP at several stream counts, and greedy agreement of
concurrent (batched) decoding with one-at-a-time decoding, against any server with an
OpenAI-compatible /v1/completions (candela, llama-server).

  batch_check.py --url http://127.0.0.1:8090 --streams 1,8,32 [--greedy] [--ref CPU.json]
      [--ttft 16,512,4000] [--out DIR] [--name candela]

Streams: N clients at once, each streaming 128 greedy tokens of a counting prompt (that
keeps going well past 128 tokens); aggregate = (tokens - N) / (last token - first token
over all streams), the same figure gpu_check.sh's 8-stream row reports. Two trials per N,
the better one printed with both.

--ttft: time to the first token of fresh prompts of those lengths (token ids), one
request at a time, median of five after a warm-up.

--greedy: the ten prompts of tests/fixtures/llama_ref.json (token ids, 32 tokens each,
temperature 0), first one request at a time, then all ten at once; prints how many texts
are identical and, with --ref (gpu_check.sh's CPU reference), how many agree with the CPU.
Standard library only.
"""
import argparse, json, os, threading, time, urllib.request, uuid

FIXTURE = "tests/fixtures/llama_ref.json"


def post_stream(url, body, rec):
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    rec["send"] = time.perf_counter()
    rec["chunks"] = 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            ev = json.loads(data)
            if "error" in ev:
                rec["error"] = ev["error"]
                break
            if ev.get("usage"):
                rec["tokens"] = ev["usage"].get("completion_tokens")
            for ch in ev.get("choices", []):
                if ch.get("text"):
                    now = time.perf_counter()
                    rec.setdefault("first", now)
                    rec["last"] = now
                    rec["chunks"] += 1


def counting(start):
    return "The numbers, one after another: " + ", ".join(str(start + i) for i in range(8)) + ","


def engine_time(url):
    """candela's own step timings from /metrics, summed over labels: (decode steps, their
    seconds, prefill passes, their seconds), or None from a server without them."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except Exception:  # noqa: BLE001 - another server, or metrics off
        return None
    tot = {}
    for line in text.splitlines():
        for name in ("candela_decode_step_seconds", "candela_prefill_seconds"):
            for suffix in ("_sum", "_count"):
                if line.startswith(name + suffix):
                    tot[name + suffix] = tot.get(name + suffix, 0.0) + float(line.rsplit(" ", 1)[1])
    if not tot:
        return None
    return (tot.get("candela_decode_step_seconds_count", 0.0),
            tot.get("candela_decode_step_seconds_sum", 0.0),
            tot.get("candela_prefill_seconds_count", 0.0),
            tot.get("candela_prefill_seconds_sum", 0.0))


def streams(url, n, max_tokens=128):
    recs = [{} for _ in range(n)]
    before = engine_time(url)
    wall0 = time.perf_counter()

    def one(k):
        body = {"prompt": counting(100 * k + 1), "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True},
                "prompt_cache_key": "bc-" + uuid.uuid4().hex, "cache_prompt": False}
        try:
            post_stream(url, body, recs[k])
        except Exception as e:  # noqa: BLE001 - reported below
            recs[k]["error"] = f"{type(e).__name__}: {e}"

    ts = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - wall0
    after = engine_time(url)
    done = [r for r in recs if "first" in r]
    errs = [r.get("error") for r in recs if r.get("error") or "first" not in r]
    if not done:
        return {"error": errs}
    engine = None
    if before and after:
        d = [a - b for a, b in zip(after, before)]
        # Where the wall time went: decode steps and prefill passes (forward pass and
        # logits copy, as the engine times them); the rest is the server loop, sampling,
        # HTTP and the client.
        engine = {"decode_steps": int(d[0]), "decode_ms": 1e3 * d[1], "prefill_passes": int(d[2]),
                  "prefill_ms": 1e3 * d[3], "wall_ms": 1e3 * wall}
    total = sum(r.get("tokens") or r["chunks"] for r in done)
    first = min(r["first"] for r in done)
    last = max(r["last"] for r in done)
    return {"streams": len(done), "tokens": total, "span_s": last - first,
            "aggregate_tok_s": (total - len(done)) / (last - first),
            "max_ttft_ms": 1000 * max(r["first"] - r["send"] for r in done), "errors": errs,
            "engine": engine}


def completion(url, ids):
    body = {"prompt": ids, "max_tokens": 32, "temperature": 0, "logprobs": 1,
            "prompt_cache_key": "bc-" + uuid.uuid4().hex, "cache_prompt": False}
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        c = json.load(r)["choices"][0]
    return {"text": c["text"], "tokens": (c.get("logprobs") or {}).get("tokens") or []}


def greedy(url, ref, out, name):
    fx = json.load(open(FIXTURE))["greedy"]
    ids = [g["prompt_ids"] for g in fx]
    alone = [completion(url, p) for p in ids]
    together = [None] * len(ids)

    def one(i):
        together[i] = completion(url, ids[i])

    ts = [threading.Thread(target=one, args=(i,)) for i in range(len(ids))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    same = sum(a["tokens"] == b["tokens"] and a["text"] == b["text"]
               for a, b in zip(alone, together))
    print(f"{name} greedy: {same}/{len(ids)} texts identical, all ten at once (batched) vs one "
          f"at a time (single-stream)", flush=True)
    for i, (a, b) in enumerate(zip(alone, together)):
        if a["text"] != b["text"]:
            print(f"  #{i} single:  {a['text']!r}\n     batched: {b['text']!r}")
    res = {"alone": alone, "together": together, "same": same}
    if ref:
        r = json.load(open(ref))
        for label, xs in (("single", alone), ("batched", together)):
            agree = sum(a["text"] == b["text"] for a, b in zip(xs, r))
            print(f"{name} greedy vs CPU reference: {label} {agree}/{len(r)} texts identical")
            res[f"cpu_{label}"] = agree
    json.dump(res, open(os.path.join(out, f"greedy_{name}.json"), "w"), indent=1)


def ttft(url, n, reps=5):
    """Median time to the first token of a fresh n-token prompt (token ids, a different
    prompt each time so no prefix cache helps), one request at a time: prefill plus one
    sampled token, over HTTP."""
    times = []
    for r in range(reps + 1):
        ids = [(i * 7919 + 13 + 104729 * r) % 32000 + 100 for i in range(n)]
        body = {"prompt": ids, "max_tokens": 1, "temperature": 0,
                "prompt_cache_key": "tt-" + uuid.uuid4().hex, "cache_prompt": False}
        req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=300) as resp:
            json.load(resp)
        if r > 0:  # the first one warms up this length
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2], times


def wait_health(url, limit=180):
    t0 = time.time()
    while time.time() - t0 < limit:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"no /health at {url} within {limit} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--streams", default="1,8,32")
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--ref")
    ap.add_argument("--out", default=".")
    ap.add_argument("--name", default="server")
    ap.add_argument("--ttft", default="",
                    help="prompt lengths (token ids) whose time to first token to measure, e.g. 16,512,4000")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    wait_health(a.url)
    for _ in range(2):  # warm-up: module load, graph captures
        streams(a.url, 2, 16)
    report = {}
    for n in [int(x) for x in a.ttft.split(",") if x]:
        try:
            med, ts = ttft(a.url, n)
            print(f"{a.name} TTFT, {n}-token prompt, one request at a time: median {med:.1f} ms "
                  f"(" + ", ".join(f"{t:.1f}" for t in ts) + ")", flush=True)
            report[f"ttft_{n}"] = ts
        except Exception as e:  # noqa: BLE001
            print(f"{a.name} TTFT {n}: not measured: {type(e).__name__}: {e}", flush=True)
    for n in [int(x) for x in a.streams.split(",") if x]:
        streams(a.url, n, 16)  # this width's graph captured before timing
        trials = [streams(a.url, n) for _ in range(2)]
        ok = [t for t in trials if "aggregate_tok_s" in t]
        if not ok:
            print(f"{a.name} {n} streams: not measured: {trials}")
            continue
        best = max(ok, key=lambda t: t["aggregate_tok_s"])
        report[n] = trials
        print(f"{a.name} {n} streams x 128 tokens over HTTP: aggregate "
              f"{best['aggregate_tok_s']:.1f} tok/s (trials "
              + ", ".join(f"{t['aggregate_tok_s']:.1f}" for t in ok)
              + f"), max TTFT {best['max_ttft_ms']:.0f} ms, {best['tokens']} tokens, "
              f"errors {best['errors']}", flush=True)
        e = best.get("engine")
        if e:
            per = e["decode_ms"] / e["decode_steps"] if e["decode_steps"] else 0.0
            print(f"{a.name} {n} streams, engine: {e['decode_steps']} decode steps in "
                  f"{e['decode_ms']:.0f} ms ({per:.2f} ms each), {e['prefill_passes']} prefill "
                  f"passes in {e['prefill_ms']:.0f} ms, of {e['wall_ms']:.0f} ms wall", flush=True)
    json.dump(report, open(os.path.join(a.out, f"streams_{a.name}.json"), "w"), indent=1)
    if a.greedy:
        try:
            greedy(a.url, a.ref, a.out, a.name)
        except Exception as e:  # noqa: BLE001
            print(f"{a.name} greedy: not measured: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
