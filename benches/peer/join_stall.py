#!/usr/bin/env python3
"""What a long prompt joining does to a stream that is decoding.

One stream (A) decodes 120 tokens; 0.15 s after it starts, a request (B) with a fresh
~1,200-token prompt and max_tokens 1 arrives. Prints, per round: B's time to its answer,
how many tokens A got meanwhile, and A's largest and median inter-token gaps (and every
gap over 50 ms). Each round's B prompt is new, so no cached prefix serves it.

    python3 benches/peer/join_stall.py [--port P | --candela target/release/candela]
"""

import argparse
import http.client
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_bench as pb  # noqa: E402


def ask_b(port, rnd, out):
    prompt = f"round {rnd} {time.time()} " + "apple banana cherry " * 400
    t = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions",
                 body=json.dumps({"prompt": prompt, "max_tokens": 1, "temperature": 0}),
                 headers={"Content-Type": "application/json"})
    r = json.loads(conn.getresponse().read())
    out["b_s"] = time.perf_counter() - t
    out["b_tokens"] = r["usage"]["prompt_tokens"]


def rounds(port, n):
    for rnd in range(n):
        box, res = {}, {}

        def a():
            box["r"] = pb.stream_completion(port, "Count with me: 1, 2, 3,", 120,
                                            {"ignore_eos": True})

        ta = threading.Thread(target=a)
        ta.start()
        time.sleep(0.15)
        t0 = time.perf_counter()
        ask_b(port, rnd, res)
        t1 = time.perf_counter()
        ta.join()
        ts = box["r"]["times"]
        gaps = [y - x for x, y in zip(ts, ts[1:])]
        during = sum(1 for t in ts if t0 < t <= t1)
        print(f"B: {res['b_tokens']} prompt tokens, answered in {res['b_s'] * 1e3:.0f} ms; "
              f"A: {during} tokens meanwhile, largest gap {max(gaps) * 1e3:.0f} ms, median "
              f"{sorted(gaps)[len(gaps) // 2] * 1e3:.1f} ms, gaps over 50 ms: "
              f"{[round(g * 1e3) for g in gaps if g > 0.05]}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, help="a running server (else one is started)")
    ap.add_argument("--candela", default=os.path.join(pb.HERE, "..", "..", "target", "release", "candela"))
    ap.add_argument("--model", default=pb.DEFAULT_MODEL)
    ap.add_argument("--data-dir", default="/tmp/cdata")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.port:
        return rounds(args.port, args.rounds)
    port = pb.free_port()
    argv = [args.candela, "--model", args.model, "--port", str(port), "--data-dir",
            args.data_dir, "--threads", str(args.threads)]
    os.makedirs("bench-out", exist_ok=True)
    with pb.Server("candela", argv, port, "bench-out/join_stall.log") as srv:
        srv.wait_ready()
        rounds(port, args.rounds)


if __name__ == "__main__":
    main()
