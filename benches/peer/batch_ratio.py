#!/usr/bin/env python3
"""Batched-decode ratio: N concurrent streams against one stream, on one server.

The peer benchmark measures the single stream and the N streams minutes apart; on a
shared machine the load changes in between and their ratio means little. This script
alternates them on one running server: each round is one single-stream request of
`--n-gen` tokens immediately followed by N concurrent ones of the same length, and the
ratio is taken per round (aggregate N-stream tok/s / single-stream tok/s); it prints
every round and the median. Two aggregates: over the whole decode window (first token of
the earliest stream to last token of the latest, so the prefill of streams admitted a
loop turn later counts against it) and in the steady state (while all N decode). Same
requests as `peer_bench.py` (random token-id prompts, temperature 1, seed 1, ignore_eos). `--llama` does the same against llama-server
(`--parallel N`).

    python3 benches/peer/batch_ratio.py [--rounds 5] [--streams 8] [--threads 2] [--llama]
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_bench as pb  # noqa: E402


def rounds(port, prompts, args, extra):
    pb.stream_completion(port, prompts.make(16), 8, extra)  # warm-up
    out = []
    for i in range(args.rounds):
        r = pb.stream_completion(port, prompts.make(args.short_prompt), args.n_gen, extra)
        n, dt = pb.decode_rate(r)
        single = n / dt
        c = pb.measure_concurrent(
            port, prompts, args.streams, args.n_gen, extra, args.short_prompt
        )
        row = {
            "single_tok_s": single,
            "single_itl_ms": 1e3 * dt / n,
            "aggregate_tok_s": c["aggregate_tok_s"],
            "mean_itl_ms": 1e3 * c["mean_itl_s"],
            "ratio": c["aggregate_tok_s"] / single,
            "steady_tok_s": c["steady_tok_s"] or 0.0,
            "steady_ratio": (c["steady_tok_s"] or 0.0) / single,
        }
        pb.log(
            f"  round {i + 1}: single {single:.1f} tok/s, {args.streams} streams "
            f"{row['aggregate_tok_s']:.1f} tok/s (mean inter-token {row['mean_itl_ms']:.1f} ms), "
            f"ratio {row['ratio']:.2f}; steady state {row['steady_tok_s']:.1f} tok/s, "
            f"ratio {row['steady_ratio']:.2f}"
        )
        out.append(row)
    med = {k: statistics.median(r[k] for r in out) for k in out[0]}
    return {"rounds": out, "median": med}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=pb.DEFAULT_MODEL)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--short-prompt", type=int, default=16)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--candela", default=os.path.join(pb.HERE, "..", "..", "target", "release", "candela"))
    ap.add_argument("--data-dir", default="/tmp/cdata")
    ap.add_argument("--llama", action="store_true", help="also llama-server")
    ap.add_argument("--llama-dir", default=pb.DEFAULT_CACHE)
    ap.add_argument("--out", default="bench-out/batch_ratio.json")
    ap.add_argument("--seed", type=int, default=20240607)
    args = ap.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    prompts = pb.Prompts(args.seed)
    res = {"loadavg_before": os.getloadavg()[0], "streams": args.streams}
    port = pb.free_port()
    argv = [args.candela, "--model", args.model, "--port", str(port), "--data-dir",
            args.data_dir, "--threads", str(args.threads), "--max-batch", str(args.streams)]
    log_dir = os.path.dirname(os.path.abspath(args.out))
    with pb.Server("candela", argv, port, os.path.join(log_dir, "candela_ratio.log")) as srv:
        srv.wait_ready()
        pb.log("candela")
        res["candela"] = rounds(port, prompts, args, {"ignore_eos": True})
    if args.llama:
        port = pb.free_port()
        argv = [os.path.join(args.llama_dir, "build", "bin", "llama-server"), "-m", args.model,
                "-t", str(args.threads), "--parallel", str(args.streams),
                "-c", str(1024 * args.streams), "--port", str(port), "--host", "127.0.0.1"]
        with pb.Server("llama-server", argv, port, os.path.join(log_dir, "llama_ratio.log")) as srv:
            srv.wait_ready()
            pb.log("llama-server")
            res["llama_server"] = rounds(port, prompts, args, {"ignore_eos": True})
    res["loadavg_after"] = os.getloadavg()[0]
    for name in ("candela", "llama_server"):
        if name in res:
            m, rs = res[name]["median"], res[name]["rounds"]
            print(
                f"{name}: median of {args.rounds} rounds: single {m['single_tok_s']:.1f} tok/s "
                f"({m['single_itl_ms']:.1f} ms/token), {args.streams} streams "
                f"{m['aggregate_tok_s']:.1f} tok/s aggregate, mean inter-token "
                f"{m['mean_itl_ms']:.1f} ms, ratio {m['ratio']:.2f}; steady state (all "
                f"{args.streams} decoding) {m['steady_tok_s']:.1f} tok/s, ratio "
                f"{m['steady_ratio']:.2f}; range of ratios {min(r['ratio'] for r in rs):.2f}-"
                f"{max(r['ratio'] for r in rs):.2f}"
            )
    print(f"load average before/after: {res['loadavg_before']:.1f}/{res['loadavg_after']:.1f}")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
