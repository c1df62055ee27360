#!/usr/bin/env python3
"""Peer benchmark: candela against llama.cpp on the same GGUF and thread count.

One run measures, for both engines:
  * pp512  - prefill tok/s of a 512-token prompt (llama-bench; candela: 512 / median
             time to first token of a streaming request with max_tokens=1);
  * tg128  - decode tok/s of 128 tokens (llama-bench; candela: 127 / median time from
             first to last token of a streaming request);
  * the same two through HTTP on llama-server, so both servers are also compared
    request for request;
  * 8 concurrent streams of 128 tokens: aggregate decode tok/s (first token of the
    earliest stream to last token of the latest, so the later streams' prefill counts
    against it), the steady-state rate (while all 8 decode), and mean inter-token time
    per stream (candela vs llama-server --parallel 8);
  * the machine's memory bandwidth (a timed large copy) and how close single-stream
    decode gets to the bound bandwidth / weight bytes.

It prints one table and writes the same as JSON to bench-out/peer.json.
Every prompt is random token ids from its own seed, so no request can reuse a cached
prefix (candela's anonymous prefix pool, llama-server's slot cache).

`--n-prompt` / `--n-gen` change the 512 / 128 (the names follow: pp128, tg64);
`--streams 0` skips the concurrent streams. `--model` takes a GGUF path or a known
model name (`qwen2.5-coder-0.5b`), which `candela fetch` resolves to its cached file.

`--isa LEVEL` (avx512, avx2vnni, avx2, scalar) measures one instruction-set level on
any machine that has it: candela's kernels are capped there (CANDELA_ISA, and the
attention kernel with CANDELA_ATTN_PATH) and llama.cpp is built for the same level
(build_llama_cpp.sh with ISA=LEVEL, in its own cache dir `<llama-dir>-LEVEL`). Below
AVX-512 candela is also built for the level (`cargo build --release` with RUSTFLAGS
"-C target-cpu=x86-64-v3", plus "+avxvnni" for avx2vnni, "x86-64" for scalar, into
target/isa-LEVEL; the first build takes as long as a fresh one): the repository's own
build is `target-cpu=native`, whose "AVX2" kernels use AVX-512 encodings (masks, 32
registers, `vpdpwssd`) on an AVX-512 machine and so overstate a real AVX2 CPU. `--candela`
names a binary to use instead; see docs/performance.md.

Stdlib only. Typical use, from the repo root:
    cargo build --release
    python3 benches/peer/peer_bench.py --model /path/to/model.gguf
    python3 benches/peer/peer_bench.py --model qwen2.5-coder-0.5b --n-prompt 128 --n-gen 64
"""

import argparse
import datetime
import http.client
import json
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_MODEL = "/tmp/cdata/models/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = os.path.join(
    os.environ.get("CANDELA_BENCH_CACHE")
    or os.path.join(os.path.expanduser("~"), ".cache", "candela-bench", "llama.cpp")
)
# Token ids drawn for prompts: clear of the special tokens at the bottom of the vocab
# and below the smallest vocab we expect (SmolLM2: 49152).
TOKEN_LO, TOKEN_HI = 1000, 40000
# --isa: the caps candela runs under (CANDELA_ISA, CANDELA_ATTN_PATH); None = no cap.
ISA_CAPS = {
    "native": {},
    "avx512": {},
    "avx2vnni": {"CANDELA_ISA": "avx2vnni", "CANDELA_ATTN_PATH": "avx2"},
    "avx2": {"CANDELA_ISA": "avx2", "CANDELA_ATTN_PATH": "avx2"},
    "scalar": {"CANDELA_ISA": "scalar", "CANDELA_ATTN_PATH": "portable"},
}
# What candela's start-up log must say for each level (its `cpu_kernels` field).
# Below AVX-512, the compiler flags a build for the level gets (what a build on a CPU
# of that level would use).
ISA_RUSTFLAGS = {
    "avx2vnni": "-C target-cpu=x86-64-v3 -C target-feature=+avxvnni",
    "avx2": "-C target-cpu=x86-64-v3",
    "scalar": "-C target-cpu=x86-64",
}
ISA_EXPECT = {
    "avx512": "quant=Avx512Vnni attention=avx512",
    "avx2vnni": "quant=Avx2Vnni attention=avx2",
    "avx2": "quant=Avx2 attention=avx2",
    "scalar": "quant=Scalar attention=portable",
}
# Weights read per decoded token if the server does not report it (SmolLM2-135M Q4_1).
FALLBACK_WEIGHT_BYTES = 81_000_000


def build_for_level(isa):
    """candela built for `isa` (ISA_RUSTFLAGS) in target/isa-ISA; its path."""
    target = os.path.join(REPO, "target", f"isa-{isa}")
    log(f"building candela for {isa} ({ISA_RUSTFLAGS[isa]}) in {target}")
    env = {**os.environ, "RUSTFLAGS": ISA_RUSTFLAGS[isa], "CARGO_TARGET_DIR": target}
    out = subprocess.run(["cargo", "build", "--release", "--bin", "candela"], cwd=REPO, env=env)
    if out.returncode != 0:
        sys.exit(f"cargo build for {isa} failed")
    return os.path.join(target, "release", "candela")


def log(msg):
    print(f"[peer] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- memory bandwidth


def _copy_worker(size, reps, q):
    src = bytearray(os.urandom(1 << 20)) * (size >> 20)
    dst = bytearray(size)
    mv_src, mv_dst = memoryview(src), memoryview(dst)
    mv_dst[:] = mv_src  # fault the pages in
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        mv_dst[:] = mv_src  # one memcpy: `size` bytes read + `size` bytes written
        best = min(best, time.perf_counter() - t0)
    q.put(best)


def memory_bandwidth(procs, size=256 << 20, reps=5):
    """Bytes/s moved (read + write) by `procs` processes each copying `size` bytes."""
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    ps = [ctx.Process(target=_copy_worker, args=(size, reps, q)) for _ in range(procs)]
    for p in ps:
        p.start()
    times = [q.get() for _ in ps]
    for p in ps:
        p.join()
    # Best-of-reps per process; the processes overlap, so sum their rates.
    return sum(2 * size / t for t in times)


# ---------------------------------------------------------------- HTTP helpers


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(port, method, path, body=None, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data else {}
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def stream_completion(port, prompt, max_tokens, extra):
    """POST a streaming /v1/completions; returns arrival times of token chunks.

    Returns dict(t_start, times, n_tokens, cached). `times` holds the arrival time of
    every chunk that carried text or a finish_reason; `n_tokens` comes from the usage
    the server reports (falls back to the number of text chunks).
    """
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body.update(extra)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    times, text_chunks, usage = [], 0, None
    t_start = time.perf_counter()
    try:
        conn.request(
            "POST",
            "/v1/completions",
            body=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
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
            now = time.perf_counter()
            ev = json.loads(payload)
            if "error" in ev:
                raise RuntimeError(f"stream error: {ev['error']}")
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev.get("choices") or []:
                if ch.get("text"):
                    text_chunks += 1
                    times.append(now)
                elif ch.get("finish_reason"):
                    times.append(now)
    finally:
        conn.close()
    n = (usage or {}).get("completion_tokens") or text_chunks
    cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"t_start": t_start, "times": times, "n_tokens": n, "cached": cached}


class Prompts:
    """Random token-id prompts, each from its own seed, so none shares a prefix."""

    def __init__(self, seed):
        self.rng = random.Random(seed)

    def make(self, n):
        return [self.rng.randrange(TOKEN_LO, TOKEN_HI) for _ in range(n)]


# ---------------------------------------------------------------- servers


class Server:
    def __init__(self, name, argv, port, log_path, env=None):
        self.name, self.port = name, port
        self.log_path = log_path
        self.log = open(log_path, "w")
        extra = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        log(f"starting {name}: {extra + ' ' if extra else ''}{' '.join(argv)}")
        self.argv = argv
        self.proc = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(env or {})},
        )

    def wait_ready(self, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            try:
                status, _ = http_json(self.port, "GET", "/health", timeout=5)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout}s")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                # A candela with sessions to spill writes them out on SIGTERM.
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def metric_value(port, name):
    try:
        status, body = http_json(port, "GET", "/metrics")
    except OSError:
        return None
    if status != 200:
        return None
    for line in body.decode(errors="replace").splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


# ---------------------------------------------------------------- measurements


def measure_pp(port, prompts, n_prompt, reps, extra):
    ttfts, cached = [], 0
    for _ in range(reps):
        r = stream_completion(port, prompts.make(n_prompt), 1, extra)
        if not r["times"]:
            raise RuntimeError("prefill request produced no token")
        ttfts.append(r["times"][0] - r["t_start"])
        cached += r["cached"] or 0
    med = statistics.median(ttfts)
    return {"tok_s": n_prompt / med, "ttft_median_s": med, "ttft_s": ttfts, "cached": cached}


def decode_rate(r):
    """(tokens after the first, seconds from first to last token) of one stream."""
    ts = r["times"]
    if len(ts) < 2 or r["n_tokens"] < 2:
        return 0, 0.0
    return r["n_tokens"] - 1, ts[-1] - ts[0]


def measure_tg(port, prompts, n_gen, reps, extra, prompt_len):
    rates, counts = [], []
    for _ in range(reps):
        r = stream_completion(port, prompts.make(prompt_len), n_gen, extra)
        n, dt = decode_rate(r)
        if dt <= 0:
            raise RuntimeError(f"decode produced {r['n_tokens']} tokens")
        rates.append(n / dt)
        counts.append(r["n_tokens"])
    return {"tok_s": statistics.median(rates), "tok_s_runs": rates, "tokens": counts}


def measure_concurrent(port, prompts, streams, n_gen, extra, prompt_len):
    reqs = [prompts.make(prompt_len) for _ in range(streams)]
    results, errors = [None] * streams, []
    barrier = threading.Barrier(streams)

    def one(i):
        try:
            barrier.wait()
            results[i] = stream_completion(port, reqs[i], n_gen, extra)
        except Exception as e:  # reported below, after all threads finished
            errors.append(e)

    ths = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {streams} streams failed: {errors[0]}")
    # Decode phase: first token of the earliest stream to last token of the latest;
    # each stream's first token is prefill output, so it is not counted.
    t0 = min(r["times"][0] for r in results)
    t1 = max(r["times"][-1] for r in results)
    decoded = sum(decode_rate(r)[0] for r in results)
    itls = []
    for r in results:
        n, dt = decode_rate(r)
        if n:
            itls.append(dt / n)
    # Steady state: from the moment every stream has its first token (all are decoding)
    # to the moment the first one ends. Each stream's tokens in that window are its
    # chunks there, scaled by its tokens per chunk (a chunk can carry a held-back token).
    a, b = max(r["times"][0] for r in results), min(r["times"][-1] for r in results)
    steady = None
    if b > a:
        n_in = 0.0
        for r in results:
            n, _ = decode_rate(r)
            chunks = len(r["times"]) - 1
            if chunks > 0:
                n_in += sum(1 for t in r["times"] if a < t <= b) * n / chunks
        steady = n_in / (b - a)
    return {
        "aggregate_tok_s": decoded / (t1 - t0),
        "steady_tok_s": steady,
        "steady_s": max(b - a, 0.0),
        "mean_itl_s": statistics.mean(itls),
        "decode_wall_s": t1 - t0,
        "tokens": [r["n_tokens"] for r in results],
        "ttft_max_s": max(r["times"][0] - r["t_start"] for r in results),
    }


def run_llama_bench(bin_dir, model, threads, reps, n_prompt, n_gen):
    argv = [
        os.path.join(bin_dir, "llama-bench"),
        "-m", model, "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
        "-r", str(reps), "-o", "json",
    ]
    log("running " + " ".join(argv))
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    res = {}
    for row in rows:
        if row.get("n_prompt") == n_prompt and row.get("n_gen") == 0:
            res[f"pp{n_prompt}"] = row["avg_ts"]
        elif row.get("n_gen") == n_gen and row.get("n_prompt") == 0:
            res[f"tg{n_gen}"] = row["avg_ts"]
    res["build_commit"] = rows[0].get("build_commit") if rows else None
    res["cpu_info"] = rows[0].get("cpu_info") if rows else None
    return res


def server_suite(port, prompts, args, extra):
    # One throwaway request: page in weights, spin up thread pools.
    stream_completion(port, prompts.make(16), 8, extra)
    out = {}
    pp, tg = f"pp{args.n_prompt}", f"tg{args.n_gen}"
    log(f"  {pp}")
    out[pp] = measure_pp(port, prompts, args.n_prompt, args.reps, extra)
    log(f"  {tg}")
    out[tg] = measure_tg(port, prompts, args.n_gen, args.reps, extra, args.short_prompt)
    if args.streams > 0:
        log(f"  {args.streams} concurrent streams")
        out["concurrent"] = measure_concurrent(
            port, prompts, args.streams, args.n_gen, extra, args.short_prompt
        )
    return out


# ---------------------------------------------------------------- report


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:  # macOS: no lscpu; sysctl names the chip ("Apple M2 Pro")
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                             capture_output=True, text=True).stdout.strip()
        if out:
            return out
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt(v, unit):
    if v is None:
        return "-"
    if unit == "ms":
        return f"{v * 1000:.1f}"
    if unit == "%":
        return f"{v * 100:.0f}%"
    if unit == "GB/s":
        return f"{v / 1e9:.1f}"
    return f"{v:.1f}"


def build_rows(res):
    c, lb, ls = res["candela"], res.get("llama_bench") or {}, res.get("llama_server") or {}
    bw, wb = res["bandwidth_bytes_s"], res["weight_bytes"]

    def g(d, *path):
        for p in path:
            if not isinstance(d, dict) or p not in d:
                return None
            d = d[p]
        return d

    pp, tg = res["pp_name"], res["tg_name"]
    c_tg = g(c, tg, "tok_s")
    rows = [
        # metric, unit, candela, llama.cpp, higher is better
        (f"{pp} tok/s (llama-bench vs candela HTTP)", "tok/s",
         g(c, pp, "tok_s"), lb.get(pp), True),
        (f"{tg} tok/s (llama-bench vs candela HTTP)", "tok/s", c_tg, lb.get(tg), True),
        (f"{pp} tok/s, HTTP server", "tok/s",
         g(c, pp, "tok_s"), g(ls, pp, "tok_s"), True),
        (f"{tg} tok/s, HTTP server", "tok/s", c_tg, g(ls, tg, "tok_s"), True),
        (f"{res['streams']}-stream aggregate decode tok/s", "tok/s",
         g(c, "concurrent", "aggregate_tok_s"), g(ls, "concurrent", "aggregate_tok_s"), True),
        (f"{res['streams']}-stream steady-state decode tok/s (all streams decoding)", "tok/s",
         g(c, "concurrent", "steady_tok_s"), g(ls, "concurrent", "steady_tok_s"), True),
        (f"{res['streams']}-stream mean inter-token ms", "ms",
         g(c, "concurrent", "mean_itl_s"), g(ls, "concurrent", "mean_itl_s"), False),
    ]
    bound = bw / wb if bw and wb else None
    lb_tg = lb.get(tg)
    rows.append((f"{tg} share of bandwidth bound", "%",
                 c_tg / bound if c_tg and bound else None,
                 lb_tg / bound if lb_tg and bound else None, True))
    # Machine figures: the same for both engines, no ratio.
    rows.append(("memory bandwidth, copy (machine)", "GB/s", bw, bw, True))
    rows.append(("decode bound = bandwidth / weight bytes", "tok/s", bound, bound, True))
    out = []
    for name, unit, cv, lv, _ in rows:
        ratio = cv / lv if cv and lv and unit not in ("GB/s",) and "bound =" not in name else None
        out.append({"metric": name, "unit": unit, "candela": cv, "llama_cpp": lv,
                    "ratio": ratio})
    return out, bound


def print_table(res, rows, bound):
    head = ("metric", "candela", "llama.cpp", "ratio")
    body = [(r["metric"] + (f" [{r['unit']}]" if r["unit"] in ("ms", "GB/s") else ""),
             fmt(r["candela"], r["unit"]), fmt(r["llama_cpp"], r["unit"]),
             f"{r['ratio']:.2f}" if r["ratio"] else "-") for r in rows]
    w = [max(len(x[i]) for x in [head] + body) for i in range(4)]
    line = "| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(head)) + " |"
    print(line)
    print("|" + "|".join("-" * (w[i] + 2) for i in range(4)) + "|")
    for b in body:
        print("| " + b[0].ljust(w[0]) + " | " + " | ".join(b[i].rjust(w[i]) for i in (1, 2, 3)) + " |")
    print()
    print(f"machine: {res['cpu']}, {res['cores']} cores, {res['threads']} threads, {res['date']}; "
          f"load average before/after: {res['loadavg_before']:.1f}/{res['loadavg_after']:.1f}")
    print(f"instruction set: {res['isa']} (candela kernels: {res.get('candela_kernels')}; "
          f"llama.cpp built with {'GGML_NATIVE' if res['isa'] == 'native' else 'ISA=' + res['isa']})")
    print(f"memory bandwidth (copy, {res['bandwidth_procs']} procs): "
          f"{res['bandwidth_bytes_s'] / 1e9:.1f} GB/s; weights {res['weight_bytes'] / 1e6:.0f} MB"
          f" per token -> decode bound {bound:.0f} tok/s" if bound else "")


# ---------------------------------------------------------------- main


def kernels_in_log(path):
    """The `cpu_kernels` field of candela's start-up log line (None if absent)."""
    with open(path, errors="replace") as f:
        for line in f:
            line = re.sub(r"\x1b\[[0-9;]*m", "", line)  # the log's colours
            m = re.search(r"cpu_kernels=(quant=\S+ attention=[\w-]+)", line)
            if m:
                return m.group(1)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help="GGUF file or known model name (default: %(default)s)")
    ap.add_argument("--n-prompt", type=int, default=512, help="prefill length (pp)")
    ap.add_argument("--n-gen", type=int, default=128, help="decode length (tg)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="repetitions per single-stream metric")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--short-prompt", type=int, default=16,
                    help="prompt tokens for decode runs (default: %(default)s)")
    ap.add_argument("--candela", default=None,
                    help="candela binary (default: target/release/candela, or for --isa "
                         "avx2/avx2vnni/scalar one built for that level in target/isa-LEVEL)")
    ap.add_argument("--data-dir", default="/tmp/cdata")
    ap.add_argument("--llama-dir", default=DEFAULT_CACHE,
                    help="llama.cpp cache dir of build_llama_cpp.sh (default: %(default)s)")
    ap.add_argument("--skip-llama", action="store_true", help="measure candela only")
    ap.add_argument("--isa", default="native", choices=sorted(ISA_CAPS),
                    help="instruction-set level of both sides (default: %(default)s)")
    ap.add_argument("--out", default=os.path.join(REPO, "bench-out", "peer.json"))
    ap.add_argument("--seed", type=int, default=20240601)
    args = ap.parse_args()

    if args.candela is None:
        args.candela = (build_for_level(args.isa) if args.isa in ISA_RUSTFLAGS
                        else os.path.join(REPO, "target", "release", "candela"))
    if not os.access(args.candela, os.X_OK):
        sys.exit(f"candela binary not found: {args.candela} (run cargo build --release)")
    model = os.path.abspath(args.model)
    if not os.path.isfile(model):
        # A known model name: candela fetches (or finds in its cache) and prints the path.
        out = subprocess.run([args.candela, "fetch", args.model, "--data-dir", args.data_dir],
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"model not found: {args.model}\n{out.stderr}")
        model = out.stdout.strip().splitlines()[-1]
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    prompts = Prompts(args.seed)

    res = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "isa": args.isa,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "model": model,
        "streams": args.streams,
        "pp_name": f"pp{args.n_prompt}",
        "tg_name": f"tg{args.n_gen}",
        "reps": args.reps,
        # A busy machine slows llama.cpp's spinning thread pool more than rayon's.
        "loadavg_before": os.getloadavg()[0],
    }

    log("memory bandwidth")
    res["bandwidth_procs"] = args.threads
    res["bandwidth_1proc_bytes_s"] = memory_bandwidth(1)
    res["bandwidth_bytes_s"] = memory_bandwidth(args.threads)

    bin_dir = None
    if not args.skip_llama:
        llama_dir = args.llama_dir if args.isa == "native" else f"{args.llama_dir}-{args.isa}"
        bin_dir = os.path.join(llama_dir, "build", "bin")
        if not all(os.access(os.path.join(bin_dir, b), os.X_OK)
                   for b in ("llama-bench", "llama-server")):
            log(f"llama.cpp ({args.isa}) not built yet: running build_llama_cpp.sh")
            subprocess.run([os.path.join(HERE, "build_llama_cpp.sh"), llama_dir],
                           check=True, stdout=subprocess.DEVNULL,
                           env={**os.environ, "ISA": args.isa})
        res["llama_bench"] = run_llama_bench(bin_dir, model, args.threads, args.reps,
                                             args.n_prompt, args.n_gen)

    port = free_port()
    argv = [args.candela, "--model", model, "--port", str(port), "--data-dir", args.data_dir,
            "--threads", str(args.threads), "--max-batch", str(max(args.streams, 1))]
    with Server("candela", argv, port, os.path.join(out_dir, "candela.log"),
                env=ISA_CAPS[args.isa]) as srv:
        srv.wait_ready()
        res["candela_kernels"] = kernels_in_log(srv.log_path)
        want = ISA_EXPECT.get(args.isa)
        if want and res["candela_kernels"] != want:
            sys.exit(f"--isa {args.isa}: candela runs {res['candela_kernels']!r}, not {want!r} "
                     "(does this CPU have that level?)")
        wb = metric_value(port, "candela_model_weight_bytes")
        res["weight_bytes"] = int(wb) if wb else FALLBACK_WEIGHT_BYTES
        log("candela")
        res["candela"] = server_suite(port, prompts, args, {"ignore_eos": True})

    if bin_dir:
        port = free_port()
        argv = [os.path.join(bin_dir, "llama-server"), "-m", model, "-t", str(args.threads),
                "--parallel", str(max(args.streams, 1)),
                "-c", str(1024 * max(args.streams, 1)),
                "--port", str(port), "--host", "127.0.0.1"]
        with Server("llama-server", argv, port, os.path.join(out_dir, "llama-server.log")) as srv:
            srv.wait_ready()
            log("llama-server")
            res["llama_server"] = server_suite(port, prompts, args, {"ignore_eos": True})

    res["loadavg_after"] = os.getloadavg()[0]
    rows, bound = build_rows(res)
    res["decode_bound_tok_s"] = bound
    res["table"] = rows
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print_table(res, rows, bound)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    if shutil.which("lscpu") is None and shutil.which("sysctl") is None:
        log("lscpu missing: machine model will read 'unknown'")
    main()
