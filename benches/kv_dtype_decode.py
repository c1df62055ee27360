#!/usr/bin/env python3
"""Decode speed of session KV cache dtypes against each other, on one machine.

Starts one candela server per `--kv-dtype` (side by side, same model and thread
count) and, round by round, sends each a streamed /v1/completions request of
`--prompt` random token ids (a fresh seed per request, so nothing is reused from a
cache) with `max_tokens` `--gen`, ignoring end of text. Decode speed is the tokens
after the first over the time from the first to the last token. The servers take
turns within a round, so a slow patch of a shared machine hits them alike. Prints
each round and the medians, and each dtype's median against the first one's.
`--attn-path avx2` (or `portable`) caps the attention kernels of every server.

Stdlib only. From the repo root, after `cargo build --release`:
    python3 benches/kv_dtype_decode.py --model /path/to/model.gguf --dtypes f16,bf16
"""

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "peer"))

from peer_bench import Prompts, Server, decode_rate, free_port, stream_completion  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="GGUF path")
    ap.add_argument("--dtypes", default="f16,bf16", help="comma-separated, the first is the base")
    ap.add_argument("--prompt", type=int, default=2000, help="prompt tokens")
    ap.add_argument("--gen", type=int, default=128, help="generated tokens")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--attn-path", choices=["portable", "avx2"],
                    help="cap the attention kernels (CANDELA_ATTN_PATH) of every server")
    ap.add_argument("--candela", default=os.path.join(REPO, "target", "release", "candela"))
    ap.add_argument("--out", default=os.path.join(REPO, "bench-out", "kv_dtype"))
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    os.makedirs(args.out, exist_ok=True)
    servers = []
    try:
        for d in dtypes:
            port = free_port()
            argv = [args.candela, "--model", args.model, "--port", str(port),
                    "--threads", str(args.threads), "--kv-dtype", d,
                    "--data-dir", os.path.join(args.out, "data"),
                    "--ctx-size", str(args.prompt + args.gen + 64)]
            env = {"CANDELA_ATTN_PATH": args.attn_path} if args.attn_path else None
            servers.append(Server(d, argv, port, os.path.join(args.out, f"{d}.log"), env))
        for s in servers:
            s.wait_ready()
        prompts = Prompts(7)
        for s in servers:  # warm-up: first-request costs (allocation, page faults)
            stream_completion(s.port, prompts.make(64), 8, {"ignore_eos": True})
        rates = {d: [] for d in dtypes}
        for r in range(args.rounds):
            line = []
            for d, s in zip(dtypes, servers):
                res = stream_completion(s.port, prompts.make(args.prompt), args.gen,
                                        {"ignore_eos": True})
                if res["cached"]:
                    raise RuntimeError(f"{d}: {res['cached']} prompt tokens came from a cache")
                n, secs = decode_rate(res)
                rates[d].append(n / secs)
                line.append(f"{d} {n / secs:7.1f}")
            print(f"round {r + 1}: " + "  ".join(line) + " tok/s", flush=True)
        base = statistics.median(rates[dtypes[0]])
        for d in dtypes:
            m = statistics.median(rates[d])
            print(f"{d:>5}: median {m:7.1f} tok/s ({m / base:.2f}x {dtypes[0]}), "
                  f"range {min(rates[d]):.1f}-{max(rates[d]):.1f}")
    finally:
        for s in servers:
            s.stop()


if __name__ == "__main__":
    main()
