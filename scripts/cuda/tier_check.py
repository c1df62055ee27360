#!/usr/bin/env python3
"""Session KV tiers on a GPU: sessions that move between GPU memory, host RAM and disk
answer exactly as sessions that never move. Two candela servers of one binary and model
on one device:

    python3 scripts/cuda/tier_check.py --bin .device/candela --model llama.gguf \
        [--device cuda] [--sessions 5] [--turns 4] [--out DIR]

  tiered  --kv-device-budget and --kv-budget of about one session each (measured from
          the first session's bytes): each turn's check-in moves the least recently used
          idle session down (GPU -> host RAM -> disk) and each next turn brings its
          session back up. Session s0 is pinned after its first turn: it must stay on
          the device throughout.
  roomy   the defaults: nothing moves.

Each session takes turns round-robin: a prompt of fixed token ids (a seeded draw), then
each turn the previous prompt, the previous completion and 8 new ids; 16 greedy tokens
per turn (ignore_eos). Printed: per turn whether the two servers' completions (token by
token, with their logprobs) and cached-token counts are equal, the tiered server's
session tiers after each round, and its tier metrics. Exit status 0 when every turn
agrees and sessions were seen in every tier, 1 otherwise, 2 when a server failed.
Standard library only.
"""
import argparse
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request

from candela_server import CandelaServer, ids


class Server(CandelaServer):
    def __init__(self, name, binary, model, args, port, data_dir, out_dir):
        super().__init__(name, binary, model, args, port, data_dir,
                         os.path.join(out_dir, f"tiers-{name}.log"), "candela=debug")

    def call(self, method, path, body=None):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                raw = r.read().decode()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{self.name}: HTTP {e.code} on {path}: {e.read().decode()[:500]}")
        return json.loads(raw) if raw.startswith(("{", "[")) else raw

    def complete(self, prompt, key):
        r = self.call("POST", "/v1/completions",
                      {"prompt": prompt, "max_tokens": 16, "temperature": 0, "logprobs": 1,
                       "ignore_eos": True, "prompt_cache_key": key})
        lp = r["choices"][0]["logprobs"]
        cached = r["usage"].get("prompt_tokens_details", {}).get("cached_tokens")
        return lp["tokens"], lp["token_logprobs"], cached, r["choices"][0]["text"]


def tiers(srv):
    lst = srv.call("GET", "/v1/sessions")
    by = {s["id"]: s["tier"] for s in lst["data"]}
    sizes = {k: lst.get(k) for k in ("device_bytes", "device_budget_bytes", "resident_bytes",
                                      "budget_bytes", "disk_bytes")}
    return by, sizes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sessions", type=int, default=5)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--out", default=".")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="tiers-")
    tag = os.path.basename(a.model)
    roomy = Server("roomy", a.bin, a.model, f"--device {a.device}", 8095,
                   os.path.join(tmp, "roomy"), a.out)
    keys = [f"s{i}" for i in range(a.sessions)]
    hist = {k: ids(10 + i, 40 + 7 * i) for i, k in enumerate(keys)}
    try:
        roomy.wait()
        # One session's bytes on this model, from the roomy server's first session.
        roomy.complete(hist[keys[0]], "probe")
        one = roomy.call("GET", "/v1/sessions/probe")["bytes"]
        roomy.call("DELETE", "/v1/sessions/probe")
        tiered = Server("tiered", a.bin, a.model,
                        f"--device {a.device} --kv-device-budget {one + one // 2} --kv-budget {one + one // 2}",
                        8096, os.path.join(tmp, "tiered"), a.out)
        tiered.wait()
    except RuntimeError as e:
        print(f"[{tag}] server failed: {e}")
        roomy.stop()
        return 2
    print(f"[{tag}] one session = {one} bytes; tiered budgets: device {one + one // 2}, host {one + one // 2}")
    agree = total = 0
    seen = set()
    pinned_left = False
    try:
        for t in range(a.turns):
            for i, k in enumerate(keys):
                x = tiered.complete(hist[k], k)
                y = roomy.complete(hist[k], k)
                total += 1
                same = x[0] == y[0] and x[1] == y[1] and x[2] == y[2]
                agree += same
                if not same:
                    print(f"[{tag}] turn {t} {k}: DIFFERENT tiered {x[0]} cached {x[2]} / roomy {y[0]} cached {y[2]}")
                # Next prompt: this one, the completion's ids are not returned, so the
                # completion's text is replaced by fresh ids the same on both sides.
                hist[k] = hist[k] + ids(1000 * t + i, 8)
                if t == 0 and k == "s0":
                    tiered.call("PATCH", "/v1/sessions/s0", {"pinned": True})
                by, _ = tiers(tiered)
                seen.update(by.values())
                if t > 0 and by.get("s0") != "device":
                    pinned_left = True
            by, sizes = tiers(tiered)
            print(f"[{tag}] after round {t}: " + " ".join(f"{k}:{by.get(k)}" for k in keys) + f"  {sizes}")
    except RuntimeError as e:
        print(f"[{tag}] failed: {e}")
        tiered.stop()
        roomy.stop()
        return 2
    metrics = tiered.call("GET", "/metrics")
    for line in metrics.splitlines():
        if line.startswith(("candela_kv_tier_move", "candela_kv_cache_bytes", "candela_kv_sessions",
                            "candela_kv_cache_device_budget", "candela_kv_cache_usage")):
            print(f"[{tag}]   {line}")
    moves = [l for l in tiered.tail(400).splitlines() if "moved" in l]
    print(f"[{tag}] {len(moves)} move lines in the tiered log; last: {moves[-1] if moves else '-'}")
    tiered.stop()
    roomy.stop()
    ok = agree == total and {"device", "host", "disk"} <= seen and not pinned_left
    print(f"[{tag}] {agree}/{total} turns equal to the server without moves; tiers seen {sorted(seen)}; "
          f"pinned s0 stayed on the device: {not pinned_left}; {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
