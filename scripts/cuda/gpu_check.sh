#!/usr/bin/env bash
# Check a CUDA build of candela on the GPU machine (run from the repo root there):
# greedy outputs against a CPU reference, single-stream decode tok/s and TTFT,
# 8-stream aggregate decode tok/s, and NVML (/metrics) vs nvidia-smi memory.
#
#   scripts/cuda/gpu_check.sh                 full check on CUDA, results under $OUT
#   scripts/cuda/gpu_check.sh --reference F   CPU mode: write the greedy outputs to F
#
# Env (defaults in brackets):
#   CANDELA_BIN [.device/candela]   MODEL [/root/cdata/models/SmolLM2-135M-Instruct.Q4_1.gguf]
#   DEVICE [cuda]  PORT [8090]  DATA_DIR [a fresh temporary directory]
#   REF [.device/cpu_greedy.json]  OUT [./gpu-check-out]
# The HTTP client is python3 with the standard library only.
#
# Every figure is measured on its own: one that fails prints `<figure>: not measured: why`
# and the others still run. The last line says how many figures were measured; the exit
# status is 0 only when all were (the reference mode: when the reference was written).
# The server's log is $OUT/candela-$DEVICE.log; its last lines are printed on failure.
set -uo pipefail

MODE=check
if [ "${1:-}" = "--reference" ]; then
    MODE=reference
    REF_OUT="${2:?--reference needs an output file}"
fi
BIN="${CANDELA_BIN:-.device/candela}"
MODEL="${MODEL:-/root/cdata/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
DEVICE="${DEVICE:-cuda}"
PORT="${PORT:-8090}"
# A data dir of its own per run: sessions the reference server spills on shutdown must not
# be indexed by the next server.
OWN_DATA=
[ -z "${DATA_DIR:-}" ] && OWN_DATA=1
DATA_DIR="${DATA_DIR:-$(mktemp -d /tmp/candela-check.XXXXXX)}"
REF="${REF:-.device/cpu_greedy.json}"
OUT="${OUT:-./gpu-check-out}"
mkdir -p "$OUT" "$DATA_DIR"
[ "$MODE" = reference ] && mkdir -p "$(dirname "$REF_OUT")"
LOG="$OUT/candela-$DEVICE.log"

if [ "$DEVICE" != cpu ]; then
    export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    ldd "$BIN" >"$OUT/ldd.txt" 2>&1
    if grep -q 'not found' "$OUT/ldd.txt"; then
        echo "gpu_check: not measured: libraries of $BIN not found:"
        grep 'not found' "$OUT/ldd.txt"
        exit 1
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader \
        >"$OUT/gpu.txt" 2>&1 || echo "nvidia-smi failed: $(head -n 1 "$OUT/gpu.txt")"
    echo "== GPU: $(head -n 1 "$OUT/gpu.txt")"
fi

RUST_LOG="${RUST_LOG:-info}" "$BIN" --device "$DEVICE" --model "$MODEL" --port "$PORT" \
    --data-dir "$DATA_DIR" >"$LOG" 2>&1 &
PID=$!
trap 'kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null; [ -n "$OWN_DATA" ] && rm -rf "$DATA_DIR"' EXIT

PYTHONUNBUFFERED=1 python3 - "$MODE" "$PORT" "${REF_OUT:-$REF}" "$OUT" "$PID" "$DEVICE" <<'PY'
import json, os, subprocess, sys, threading, time, urllib.error, urllib.request, uuid

mode, port, ref_path, out_dir, pid, device = sys.argv[1:7]
BASE = f"http://127.0.0.1:{port}"
FIXTURE = "tests/fixtures/llama_ref.json"


def post(path, body, timeout=300):
    req = urllib.request.Request(BASE + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def get(path, timeout=30):
    with urllib.request.urlopen(BASE + path, timeout=timeout) as r:
        return r.read().decode()


def wait_health(limit=300):
    t0 = time.time()
    while time.time() - t0 < limit:
        try:
            os.kill(int(pid), 0)
        except OSError:
            sys.exit(f"candela exited before /health answered (see {out_dir})")
        try:
            get("/health", timeout=5)
            return time.time() - t0
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    sys.exit("no /health within %d s" % limit)


def greedy():
    fx = json.load(open(FIXTURE))
    res = []
    for g in fx["greedy"]:
        r = post("/v1/completions", {
            "prompt": g["prompt_ids"], "max_tokens": 32, "temperature": 0, "logprobs": 1,
            # fresh session: no prefix reuse, same prefill every time
            "prompt_cache_key": "gpucheck-" + uuid.uuid4().hex})
        c = r["choices"][0]
        res.append({"prompt": g["prompt"], "text": c["text"],
                    "finish_reason": c["finish_reason"],
                    "tokens": (c.get("logprobs") or {}).get("tokens") or [],
                    "token_logprobs": (c.get("logprobs") or {}).get("token_logprobs") or []})
    return res


def stream(prompt, max_tokens, rec):
    """One streamed completion; fills rec with send/first/last times and token count."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "prompt_cache_key": "gpucheck-" + uuid.uuid4().hex}
    req = urllib.request.Request(BASE + "/v1/completions", json.dumps(body).encode(),
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
                rec["tokens"] = ev["usage"]["completion_tokens"]
            for ch in ev.get("choices", []):
                if ch.get("text"):
                    now = time.perf_counter()
                    rec.setdefault("first", now)
                    rec["last"] = now
                    rec["chunks"] += 1


def rate(rec):
    n = rec.get("tokens", rec["chunks"])
    span = rec["last"] - rec["first"]
    return (n - 1) / span if span > 0 else float("nan")


def mem_pair():
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv"],
                             capture_output=True, text=True).stdout
    except OSError:
        smi = ""
    metrics = get("/metrics")
    smi_mib = [float(l.split()[0]) for l in smi.splitlines()[1:] if l.strip()]
    nvml = [float(l.split()[-1]) for l in metrics.splitlines()
            if l.startswith("candela_gpu_memory_used_bytes")]
    return smi.strip(), smi_mib, nvml


def counting(start):
    # Plain-text continuation that greedy decoding keeps going well past 128 tokens.
    return "The numbers, one after another: " + ", ".join(str(start + i) for i in range(8)) + ","


def why(e):
    if isinstance(e, urllib.error.HTTPError):
        try:
            body = e.read().decode()[:300]
        except OSError:
            body = ""
        return f"HTTP {e.code} {body}"
    return f"{type(e).__name__}: {e}"


def check_greedy(report):
    g = greedy()
    json.dump(g, open(os.path.join(out_dir, f"greedy_{device}.json"), "w"), indent=1)
    try:
        ref = json.load(open(ref_path))
    except (OSError, ValueError) as e:
        raise RuntimeError(f"no CPU reference to compare with ({ref_path}: {why(e)}); "
                           f"this device's outputs are in greedy_{device}.json")
    rows, same_text = [], 0
    for i, (a, b) in enumerate(zip(g, ref)):
        agree = 0
        for x, y in zip(a["tokens"], b["tokens"]):
            if x != y:
                break
            agree += 1
        same_text += a["text"] == b["text"]
        rows.append({"i": i, "agree": agree, "dev_n": len(a["tokens"]),
                     "cpu_n": len(b["tokens"]), "same_text": a["text"] == b["text"],
                     "dev": a["text"], "cpu": b["text"]})
    report["greedy"] = {"same_text": same_text, "prompts": len(rows),
                        "tokens_agree": sum(r["agree"] for r in rows),
                        "tokens_total": sum(max(r["dev_n"], r["cpu_n"]) for r in rows),
                        "rows": rows}
    print(f"greedy: {same_text}/{len(rows)} texts identical to the CPU reference; leading "
          f"tokens agreeing per prompt: {[(r['agree'], max(r['dev_n'], r['cpu_n'])) for r in rows]}")
    for r in rows:
        if not r["same_text"]:
            print(f"  #{r['i']} {device}: {r['dev']!r}\n      cpu:  {r['cpu']!r}")


def check_single(report):
    prompt = counting(1)
    for _ in range(2):  # warm-up: module load, kernels, cuBLAS handles
        stream(prompt, 16, {})
    singles = []
    for _ in range(3):
        rec = {}
        stream(prompt, 128, rec)
        if "first" not in rec:
            raise RuntimeError(f"no token streamed ({rec.get('error')})")
        singles.append({"ttft_s": rec["first"] - rec["send"], "tokens": rec.get("tokens"),
                        "decode_tok_s": rate(rec)})
    singles.sort(key=lambda s: s["decode_tok_s"])
    med = singles[len(singles) // 2]
    report["single"] = {"runs": singles, "median": med}
    print(f"single stream: decode {med['decode_tok_s']:.1f} tok/s over {med['tokens']} tokens, "
          f"TTFT {med['ttft_s'] * 1000:.1f} ms  (runs: "
          + ", ".join(f"{s['decode_tok_s']:.1f}" for s in singles) + ")")


def check_concurrent(report):
    conc = []
    for trial in range(2):
        recs = [{} for _ in range(8)]

        def one(k):
            try:
                stream(counting(100 * k + 1), 128, recs[k])
            except Exception as e:  # noqa: BLE001 - recorded, reported below
                recs[k]["error"] = why(e)

        ts = [threading.Thread(target=one, args=(k,)) for k in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        done = [r for r in recs if "first" in r]
        errs = [r.get("error") for r in recs if r.get("error") or "first" not in r]
        if not done:
            raise RuntimeError(f"no stream produced a token: {errs}")
        total = sum(r.get("tokens", r["chunks"]) for r in done)
        first = min(r["first"] for r in done)
        last = max(r["last"] for r in done)
        conc.append({"total_tokens": total, "span_s": last - first,
                     "aggregate_tok_s": (total - len(done)) / (last - first),
                     "per_stream_tok_s": [rate(r) for r in done],
                     "max_ttft_s": max(r["first"] - r["send"] for r in done),
                     "errors": errs})
        print(f"8 streams (trial {trial}): {total} tokens from {len(done)} streams, aggregate "
              f"{conc[-1]['aggregate_tok_s']:.1f} tok/s, max TTFT "
              f"{conc[-1]['max_ttft_s'] * 1000:.0f} ms, errors {errs}")
    report["concurrent8"] = conc


def check_memory(report):
    mems = []
    for _ in range(3):
        time.sleep(6)  # let the probe sampler take a fresh reading
        smi, smi_mib, nvml = mem_pair()
        if not smi_mib:
            raise RuntimeError("nvidia-smi gave no memory.used reading"
                               + (f": {smi[:200]!r}" if smi else " (not found)"))
        if not nvml:
            raise RuntimeError("/metrics has no candela_gpu_memory_used_bytes "
                               "(NVML not loaded, or no GPU seen by it)")
        pair = {"nvidia_smi_mib": smi_mib, "nvml_bytes": nvml,
                "rel_diff": abs(nvml[0] / 2**20 - smi_mib[0]) / smi_mib[0]}
        mems.append(pair)
        print(f"memory: nvidia-smi {smi_mib} MiB, candela_gpu_memory_used_bytes {nvml} "
              f"(= {[round(b / 2**20, 1) for b in nvml]} MiB), rel diff {pair['rel_diff']:.5f}")
    report["memory"] = mems
    report["gpu_metrics"] = [l for l in get("/metrics").splitlines()
                             if l.startswith("candela_gpu")]


try:
    print(f"== {device}: /health after {wait_health():.1f} s", flush=True)
except SystemExit as e:
    print(f"gpu_check: not measured: {e.code}")
    sys.exit(1)
if mode == "reference":
    try:
        g = greedy()
    except Exception as e:  # noqa: BLE001
        print(f"reference: not written: {why(e)}")
        sys.exit(1)
    json.dump(g, open(ref_path, "w"), indent=1)
    print(f"reference: wrote {len(g)} greedy outputs to {ref_path}")
    sys.exit(0)

report = {}
figures = [("greedy", check_greedy), ("single stream", check_single),
           ("8 streams", check_concurrent), ("memory", check_memory)]
measured = 0
for name, fn in figures:
    try:
        fn(report)
        measured += 1
    except Exception as e:  # noqa: BLE001 - say why, go on with the next figure
        print(f"{name}: not measured: {why(e)}", flush=True)
        report[name] = {"error": why(e)}
json.dump(report, open(os.path.join(out_dir, "gpu_check.json"), "w"), indent=1)
print(f"gpu_check: {measured} of {len(figures)} figures measured "
      f"(details in {os.path.join(out_dir, 'gpu_check.json')})")
sys.exit(0 if measured == len(figures) else 1)
PY
rc=$?
if [ $rc != 0 ]; then
    echo "== last lines of $LOG"
    tail -n 20 "$LOG"
fi
exit $rc
