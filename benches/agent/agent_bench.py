#!/usr/bin/env python3
"""Agent workload: candela against llama.cpp's llama-server, many sessions taking turns.

Each session is an agent conversation: a system prompt of its own (~--initial-tokens
of text), then --turns turns, each appending ~--new-tokens of new user text and
generating exactly --gen-tokens (temperature 0, ignore_eos). The assistant's reply
goes into that engine's history, so the prompt of turn t is the whole conversation so
far and grows past 2k tokens by the last turn. Sessions take turns round-robin, one
request at a time (concurrency 1): session 0 turn 0, session 1 turn 0, ..., session 0
turn 1, ... Requests go to both servers alternately (candela, llama, llama, candela,
...) so that load from anything else on the machine falls on both alike.

Two regimes, each with both servers started fresh:
  1  "fits":      --sessions1 sessions whose caches fit the KV budget (budget = 2x
                  their final size);
  2  "overflow":  --sessions2 sessions whose final caches add up to --overcommit x
                  the budget (default 4x): every turn finds its session evicted.

Fairness. Both get the same GGUF, --threads and context. candela: --kv-budget B
(idle session caches in memory) and a spill dir on disk. llama-server: one slot
(-np 1, the workload is sequential), prompt cache on with --cache-ram = B in MiB (the
same bytes), cache_prompt true. llama-server keeps the slot's own KV (the running
session) outside --cache-ram, as candela keeps the running session outside its
budget. On a new task llama-server saves the slot's state into the RAM cache and
loads the cached state with the longest common prefix; past --cache-ram it drops the
oldest states, so in regime 2 it re-prefills the whole history. candela names the
session (prompt_cache_key) and restores it from its spill file. Session affinity on
llama-server (id_slot) does not help here: one slot, more sessions than slots.

Reported per server and regime: TTFT p50/p95 per turn index, p50 over turns >= 1,
cached prompt tokens, and total wall time. Then, on candela in regime 2, the
restore-vs-re-prefill ratio directly: for a few sessions spilled to disk (their file
pages dropped from the page cache first with posix_fadvise, so the read hits the
disk), TTFT of the next turn restored from disk vs TTFT of the same prompt under a
new session key (no cache), plus the restore time from candela_kv_restore_seconds.

Stdlib only. From the repo root, after `cargo build --release`:
    python3 benches/agent/agent_bench.py                  # both regimes, defaults
    python3 benches/agent/agent_bench.py --regime 2 --sessions2 16 --turns 12
Prints a table and writes bench-out/agent.json.
"""

import argparse
import datetime
import http.client
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_MODEL = "/tmp/cdata/models/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LLAMA = os.path.join(
    os.environ.get("CANDELA_BENCH_CACHE")
    or os.path.join(os.path.expanduser("~"), ".cache", "candela-bench", "llama.cpp"),
    "build", "bin", "llama-server",
)
MIB = 1 << 20
# candela allocates caches in steps of this many tokens (kv::GROW_TOKENS).
GROW = 256
# This word list tokenizes to ~1.05 tokens per word (SmolLM2's tokenizer, measured);
# the tokens each prompt really had are in the results.
TOKENS_PER_WORD = 1.05
# Chat-template tokens per message (role header, end marker), for size estimates.
TEMPLATE_OVERHEAD = 6

WORDS = (
    "the of and to in is was for on are with as at be by this have from or one had "
    "not but what all were when we there can an your which their said if do will each "
    "about how up out them then she many some so these would other into has more her "
    "two like him see time could no make than first been its who now people my made "
    "over did down only way find use may water long little very after words called just "
    "where most know get through back much before go good new write our used me man "
    "too any day same right look think also around another came come work three word "
    "must because does part even place well such here take why things help put years "
    "different away again off went old number great tell men say small every found still "
    "between name should home big give air line set own under read last never us left "
    "end along while might next sound below saw something thought both few those always "
    "looked show large often together asked house world going want school important until "
    "form food keep children feet land side without boy once animals life enough took "
    "sometimes four head above kind began almost live page got earth need far hand high "
    "year mother light parts country father let night following picture being study second "
    "eyes soon times story boys since white days ever paper hard near sentence better best "
    "across during today others sure means knew why table file code test build error "
    "function value list open close run step plan check result output input tool call"
).split()


# The server handling, HTTP helper and port picker are the peer benchmark's.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "peer"))
from peer_bench import Server, free_port, http_json  # noqa: E402


def log(msg):
    print(f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def metric(port, name):
    """Value of an unlabelled metric (or the sum over its labels)."""
    status, body = http_json(port, "GET", "/metrics")
    if status != 200:
        return None
    total, seen = 0.0, False
    for line in body.decode(errors="replace").splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return total if seen else None


def chat(port, messages, max_tokens, extra):
    """One streaming chat completion. Returns ttft, total seconds, text and usage."""
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body.update(extra)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    t0 = time.perf_counter()
    ttft, parts, usage, timings = None, [], None, None
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            ev = json.loads(payload)
            if "error" in ev:
                raise RuntimeError(f"stream error: {ev['error']}")
            if ev.get("usage"):
                usage = ev["usage"]
            if ev.get("timings"):
                timings = ev["timings"]
            for ch in ev.get("choices") or []:
                text = (ch.get("delta") or {}).get("content")
                if text:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    parts.append(text)
    finally:
        conn.close()
    total = time.perf_counter() - t0
    usage = usage or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is None and timings:
        cached = timings.get("cache_n")
    return {
        "ttft": ttft if ttft is not None else total,
        "total": total,
        "text": "".join(parts),
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "cached": cached,
    }


def words(rng, n_tokens):
    return " ".join(rng.choice(WORDS) for _ in range(max(1, round(n_tokens / TOKENS_PER_WORD))))


class Workload:
    """Deterministic texts: session s's system prompt and its user messages."""

    def __init__(self, seed, initial, new):
        self.seed, self.initial, self.new = seed, initial, new

    def system(self, s):
        rng = random.Random(f"{self.seed}/sys/{s}")
        return (f"You are agent {s}. Project notes follow. "
                + words(rng, self.initial - 12) + ".")

    def user(self, s, t):
        rng = random.Random(f"{self.seed}/user/{s}/{t}")
        return f"Step {t}: " + words(rng, self.new - 4) + "."


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def bytes_per_token(candela, model, data_dir, dtype):
    out = subprocess.run([candela, "plan", "--model", model, "--data-dir", data_dir,
                          "--kv-dtype", dtype], capture_output=True, text=True, check=True)
    m = re.search(r"KV per token\s+(\d+) bytes", out.stdout)
    if not m:
        raise RuntimeError(f"cannot read `candela plan` output:\n{out.stdout}{out.stderr}")
    return int(m.group(1))


def fadvise_dontneed(path):
    """Drop one file's pages from the page cache (only this file: harmless to others)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    finally:
        os.close(fd)


def spill_file(spill_dir, session):
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else f"%{ord(c):02x}"
                   for c in session)
    return os.path.join(spill_dir, f"{safe}.kv.safetensors")


def run_regime(args, regime, n_sessions, bpt):
    final_tokens = args.initial_tokens + args.turns * (
        args.new_tokens + args.gen_tokens + 2 * TEMPLATE_OVERHEAD) + TEMPLATE_OVERHEAD
    session_bytes = -(-final_tokens // GROW) * GROW * bpt
    total = n_sessions * session_bytes
    # Regime 2 sizes the budget from a lower bound of the final history (no template
    # tokens), so the caches end at >= --overcommit x the budget.
    low = n_sessions * (args.initial_tokens + args.turns * (args.new_tokens + args.gen_tokens)) * bpt
    budget_mib = (2 * total if regime == 1 else low // args.overcommit) // MIB
    budget_mib = max(1, budget_mib)
    log(f"regime {regime}: {n_sessions} sessions x ~{final_tokens} tokens "
        f"(~{session_bytes / MIB:.1f} MiB each), KV budget {budget_mib} MiB")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    spill_dir = os.path.join(out_dir, f"agent-spill-r{regime}")
    shutil.rmtree(spill_dir, ignore_errors=True)
    os.makedirs(spill_dir)
    ctx = final_tokens + 512
    servers = {}
    port = free_port()
    servers["candela"] = Server("candela", [
        args.candela, "serve", "--model", args.model, "--data-dir", args.data_dir,
        "--port", str(port), "--threads", str(args.threads), "--ctx-size", str(ctx),
        "--kv-budget", f"{budget_mib}MiB", "--kv-spill-dir", spill_dir,
        "--kv-disk-budget", "16GiB",
    ] + (["--kv-dtype", args.kv_dtype] if args.kv_dtype else []), port, os.path.join(out_dir, f"agent-candela-r{regime}.log"))
    if not args.skip_llama:
        port = free_port()
        servers["llama"] = Server("llama-server", [
            args.llama_server, "-m", args.model, "-t", str(args.threads), "-np", "1",
            "-c", str(ctx), "--cache-ram", str(budget_mib), "--port", str(port),
            "--host", "127.0.0.1", "--no-webui",
        ] + args.llama_extra.split(), port, os.path.join(out_dir, f"agent-llama-r{regime}.log"))
    try:
        for s in servers.values():
            s.wait_ready()
        wl = Workload(args.seed, args.initial_tokens, args.new_tokens)
        hist = {name: [[{"role": "system", "content": wl.system(i)}]
                       for i in range(n_sessions)] for name in servers}
        rows = {name: [] for name in servers}
        wall = {name: 0.0 for name in servers}
        names = list(servers)
        step = 0
        for t in range(args.turns):
            for i in range(n_sessions):
                order = names if step % 2 == 0 else names[::-1]
                step += 1
                for name in order:
                    msgs = hist[name][i] + [{"role": "user", "content": wl.user(i, t)}]
                    extra = ({"prompt_cache_key": f"agent-{i}"} if name == "candela"
                             else {"cache_prompt": True})
                    r = chat(servers[name].port, msgs, args.gen_tokens, extra)
                    wall[name] += r["total"]
                    hist[name][i] = msgs + [{"role": "assistant", "content": r["text"]}]
                    rows[name].append({"session": i, "turn": t, "ttft": r["ttft"],
                                       "total": r["total"], "prompt_tokens": r["prompt_tokens"],
                                       "completion_tokens": r["completion_tokens"],
                                       "cached": r["cached"]})
                    if r["completion_tokens"] not in (None, args.gen_tokens):
                        log(f"warning: {name} generated {r['completion_tokens']} tokens")
            log(f"regime {regime} turn {t}: " + ", ".join(
                f"{n} p50 ttft {statistics.median(x['ttft'] for x in rows[n] if x['turn'] == t):.3f}s"
                for n in names))
        res = {"sessions": n_sessions, "budget_mib": budget_mib, "ctx": ctx,
               "servers": {n: {"argv": servers[n].argv, "wall_seconds": wall[n],
                               "requests": rows[n]} for n in names}}
        st, body = http_json(servers["candela"].port, "GET", "/v1/sessions")
        if st == 200:
            sess = json.loads(body)
            sess = sess.get("data", sess) if isinstance(sess, dict) else sess
            tokens = sum(x["tokens"] for x in sess)
            res["candela_sessions"] = {
                "count": len(sess), "tokens": tokens,
                "cache_bytes_at_end": tokens * bpt,
                "x_budget": tokens * bpt / (budget_mib * MIB),
                "tiers": {k: sum(1 for x in sess if x["tier"] == k) for k in ("memory", "disk")},
            }
        for name in ("candela_kv_restore_seconds_total", "candela_kv_restore_bytes_total",
                     "candela_kv_spill_seconds_total", "candela_kv_spill_bytes_total"):
            res.setdefault("candela_metrics", {})[name] = metric(servers["candela"].port, name)
        if regime == 2 and args.restore_samples > 0:
            res["restore_vs_prefill"] = restore_probe(args, servers["candela"], wl, hist["candela"],
                                                      spill_dir)
        return res
    finally:
        for s in servers.values():
            s.stop()


def restore_probe(args, srv, wl, hist, spill_dir):
    """TTFT of a disk-spilled session's next turn vs the same prompt with no cache."""
    st, body = http_json(srv.port, "GET", "/v1/sessions")
    sess = json.loads(body)
    sess = sess.get("data", sess) if isinstance(sess, dict) else sess
    on_disk = sorted((x for x in sess if x["tier"] == "disk"), key=lambda x: x["id"])
    out = []
    for x in on_disk[:args.restore_samples]:
        i = int(x["id"].split("-")[1])
        msgs = hist[i] + [{"role": "user", "content": wl.user(i, args.turns)}]
        path = spill_file(spill_dir, x["id"])
        cold = fadvise_dontneed(path)
        size = os.path.getsize(path) if os.path.exists(path) else None
        r0 = metric(srv.port, "candela_kv_restore_seconds_total") or 0.0
        b0 = metric(srv.port, "candela_kv_restore_bytes_total") or 0.0
        warm = chat(srv.port, msgs, args.gen_tokens, {"prompt_cache_key": x["id"]})
        # The engine publishes store counters when the request is checked in, just after
        # its last token: wait for the restore to show up.
        for _ in range(50):
            if (metric(srv.port, "candela_kv_restore_bytes_total") or 0.0) > b0:
                break
            time.sleep(0.05)
        r1 = metric(srv.port, "candela_kv_restore_seconds_total") or 0.0
        fresh_key = f"probe-nocache-{i}"
        fresh = chat(srv.port, msgs, args.gen_tokens, {"prompt_cache_key": fresh_key})
        http_json(srv.port, "DELETE", f"/v1/sessions/{fresh_key}")
        out.append({"session": x["id"], "spill_file_bytes": size, "page_cache_dropped": cold,
                    "prompt_tokens": warm["prompt_tokens"], "cached_restored": warm["cached"],
                    "cached_nocache": fresh["cached"], "restore_seconds": r1 - r0,
                    "ttft_restored": warm["ttft"], "ttft_nocache": fresh["ttft"],
                    "ratio": warm["ttft"] / fresh["ttft"], "same_text": warm["text"] == fresh["text"]})
        log(f"probe {x['id']}: restored ttft {warm['ttft']:.3f}s (restore {r1 - r0:.3f}s, "
            f"cached {warm['cached']}) vs no cache {fresh['ttft']:.3f}s")
    return out


def summarize(res, turns):
    """Rows: per regime, server, turn index -> p50/p95 ttft."""
    lines = []
    for reg, r in res["regimes"].items():
        names = list(r["servers"])
        lines.append(f"\nregime {reg}: {r['sessions']} sessions, KV budget {r['budget_mib']} MiB"
                     + (f", caches at end {r['candela_sessions']['x_budget']:.1f}x budget"
                        if "candela_sessions" in r else ""))
        head = "| turn | prompt tok | " + " | ".join(
            f"{n} p50 | {n} p95 | {n} cached" for n in names) + " |"
        lines.append(head)
        lines.append("|" + "---|" * (2 + 3 * len(names)))
        for t in range(turns):
            cells = []
            ptok = None
            for n in names:
                xs = [q for q in r["servers"][n]["requests"] if q["turn"] == t]
                tt = [q["ttft"] for q in xs]
                ptok = ptok or statistics.median(q["prompt_tokens"] or 0 for q in xs)
                cached = statistics.median(q["cached"] or 0 for q in xs)
                cells += [f"{pct(tt, 50):.3f}", f"{pct(tt, 95):.3f}", f"{cached:.0f}"]
            lines.append(f"| {t} | {ptok:.0f} | " + " | ".join(cells) + " |")
        summ = {}
        for n in names:
            later = [q["ttft"] for q in r["servers"][n]["requests"] if q["turn"] >= 1]
            summ[n] = {"ttft_p50_turns_ge1": pct(later, 50), "ttft_p95_turns_ge1": pct(later, 95),
                       "wall_seconds": r["servers"][n]["wall_seconds"]}
            lines.append(f"{n}: TTFT p50 {summ[n]['ttft_p50_turns_ge1']:.3f}s p95 "
                         f"{summ[n]['ttft_p95_turns_ge1']:.3f}s over turns >= 1; "
                         f"total {summ[n]['wall_seconds']:.1f}s")
        if "candela" in summ and "llama" in summ:
            ratio = summ["candela"]["ttft_p50_turns_ge1"] / summ["llama"]["ttft_p50_turns_ge1"]
            summ["ttft_p50_ratio_candela_over_llama"] = ratio
            lines.append(f"candela/llama TTFT p50 (turns >= 1): {ratio:.2f}; total time "
                         f"{summ['candela']['wall_seconds'] / summ['llama']['wall_seconds']:.2f}")
        r["summary"] = summ
        probe = r.get("restore_vs_prefill")
        if probe:
            ratios = [p["ratio"] for p in probe]
            lines.append(f"restore from disk vs re-prefill (candela, {len(probe)} sessions): "
                         f"TTFT {statistics.median(p['ttft_restored'] for p in probe):.3f}s vs "
                         f"{statistics.median(p['ttft_nocache'] for p in probe):.3f}s, "
                         f"ratio p50 {statistics.median(ratios):.3f}; restore itself "
                         f"{statistics.median(p['restore_seconds'] for p in probe):.3f}s for "
                         f"{statistics.median(p['spill_file_bytes'] or 0 for p in probe) / MIB:.1f} MiB")
            r["restore_summary"] = {"ttft_ratio_p50": statistics.median(ratios)}
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--regime", choices=["1", "2", "both"], default="both")
    ap.add_argument("--sessions1", type=int, default=2, help="sessions in regime 1")
    ap.add_argument("--sessions2", type=int, default=8, help="sessions in regime 2")
    ap.add_argument("--overcommit", type=int, default=4,
                    help="regime 2: final caches / KV budget (default 4)")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--initial-tokens", type=int, default=1536,
                    help="approximate tokens of each session's system prompt")
    ap.add_argument("--new-tokens", type=int, default=64, help="~tokens of user text per turn")
    ap.add_argument("--gen-tokens", type=int, default=32, help="tokens generated per turn")
    ap.add_argument("--restore-samples", type=int, default=4,
                    help="regime 2: spilled sessions probed for restore vs re-prefill")
    ap.add_argument("--kv-dtype", default=None,
                    help="candela's --kv-dtype (default: candela's own default, f16 on CPU)")
    ap.add_argument("--candela", default=os.path.join(REPO, "target", "release", "candela"))
    ap.add_argument("--llama-server", default=DEFAULT_LLAMA)
    ap.add_argument("--data-dir", default="/tmp/cdata")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--llama-extra", default="",
                    help="more llama-server flags, e.g. '--poll 0' on a busy machine")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(REPO, "bench-out", "agent.json"))
    args = ap.parse_args()
    # Stop the servers on SIGTERM too (the `finally` blocks run on SystemExit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    bpt = bytes_per_token(args.candela, args.model, args.data_dir, args.kv_dtype or "f16")
    res = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                    "load_avg_at_start": os.getloadavg()},
           "args": vars(args), "kv_bytes_per_token": bpt, "regimes": {}}
    regimes = ["1", "2"] if args.regime == "both" else [args.regime]
    t0 = time.time()
    for reg in regimes:
        n = args.sessions1 if reg == "1" else args.sessions2
        res["regimes"][reg] = run_regime(args, int(reg), n, bpt)
        with open(args.out + ".partial", "w") as f:
            json.dump(res, f, indent=1)
    res["host"]["load_avg_at_end"] = os.getloadavg()
    res["bench_seconds"] = time.time() - t0
    table = summarize(res, args.turns)
    print(table)
    res["table"] = table
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
