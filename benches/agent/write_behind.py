#!/usr/bin/env python3
"""What writing every session behind its turn (`--kv-shared true`) costs in decode speed.

Starts candela with and without `--kv-shared` (same model, threads, budgets), round by
round in alternation so outside load falls on both, and runs N agent sessions at once:
each turn appends user text to a growing history (~1.5k tokens at the start) and streams
exactly --gen-tokens tokens (temperature 0, ignore_eos). With N sessions in flight, every
turn that ends writes its session behind while the others decode, so their decode speed
shows the cost. Reports per mode the median decode speed of a stream (tokens after the
first / time from the first to the last token) and the median time to first token, and
the with/without ratio of each round (the two modes of a round run back to back, so a
change of outside load between rounds cancels in its ratio).

Stdlib only. Run after `cargo build --release`:
    python3 benches/agent/write_behind.py [--sessions 4] [--turns 4] [--rounds 2]
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = ("log request latency span parse group slow summary trace timing line file "
         "report field value order limit window bucket count").split()


def text(n_words, seed):
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n_words))


def start(binary, model, data_dir, spill, threads, shared):
    args = [binary, "serve", "--port", "0", "--model", model, "--data-dir", data_dir,
            "--kv-spill-dir", spill, "--threads", str(threads), "--max-batch", "8",
            "--kv-shared", "true" if shared else "false"]
    env = dict(os.environ, CANDELA_CONFIG="/dev/null")
    p = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
    url = None
    for line in p.stderr:
        if "listening on " in line:
            url = line.split("listening on ")[1].split()[0]
            break
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    for _ in range(600):
        try:
            if urllib.request.urlopen(url + "/health").status == 200:
                return p, url
        except Exception:
            time.sleep(0.1)
    raise SystemExit("server never became healthy")


def stream_turn(url, key, prompt, gen):
    body = json.dumps({"prompt": prompt, "max_tokens": gen, "temperature": 0,
                       "ignore_eos": True, "stream": True,
                       "prompt_cache_key": key}).encode()
    req = urllib.request.Request(url + "/v1/completions", body,
                                 {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    stamps, out = [], []
    with urllib.request.urlopen(req) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("choices") and ev["choices"][0].get("text"):
                stamps.append(time.perf_counter())
                out.append(ev["choices"][0]["text"])
    ttft = stamps[0] - t0
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return ttft, decode, "".join(out)


def run_mode(a, shared):
    spill = tempfile.mkdtemp(prefix="wb-")
    p, url = start(a.candela, a.model, a.data_dir, spill, a.threads, shared)
    ttfts, decodes = [], []
    lock = threading.Lock()

    def session(i):
        history = text(a.initial_words, i) + "\n"
        for t in range(a.turns):
            history += text(a.new_words, i * 31 + t) + "\n"
            ttft, dec, out = stream_turn(url, f"wb-{i}", history, a.gen_tokens)
            history += out + "\n"
            if t > 0:  # the first turn is a cold prefill of the whole history
                with lock:
                    ttfts.append(ttft)
                    decodes.append(dec)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(a.sessions)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    p.send_signal(signal.SIGTERM)
    p.wait(60)
    shutil.rmtree(spill, ignore_errors=True)
    return ttfts, decodes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--candela", default=os.path.join(REPO, "target", "release", "candela"))
    ap.add_argument("--model", default="default")
    ap.add_argument("--data-dir", default=os.environ.get("CANDELA_TEST_DATA_DIR", "/tmp/cdata"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--initial-words", type=int, default=1100, help="~1.5k tokens")
    ap.add_argument("--new-words", type=int, default=40)
    ap.add_argument("--gen-tokens", type=int, default=64)
    a = ap.parse_args()
    res = {False: ([], []), True: ([], [])}
    ratios = []
    for r in range(a.rounds):
        medians = {}
        for shared in (False, True):
            t, d = run_mode(a, shared)
            res[shared][0].extend(t)
            res[shared][1].extend(d)
            medians[shared] = statistics.median(d)
            print(f"round {r} shared={shared}: decode median {statistics.median(d):.1f} tok/s, "
                  f"ttft median {statistics.median(t) * 1000:.0f} ms", flush=True)
        ratios.append(medians[True] / medians[False])
    for shared in (False, True):
        t, d = res[shared]
        print(f"{'--kv-shared true ' if shared else '--kv-shared false'}: "
              f"decode {statistics.median(d):.1f} tok/s per stream (median of {len(d)}), "
              f"ttft {statistics.median(t) * 1000:.0f} ms")
    off, on = statistics.median(res[False][1]), statistics.median(res[True][1])
    print(f"decode with write-behind / without: {on / off:.3f} (pooled medians); "
          f"per round {', '.join(f'{x:.3f}' for x in ratios)}, "
          f"median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
