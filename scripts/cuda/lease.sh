#!/usr/bin/env bash
# The GPU machine's side of a measurement lease, in two calls (the default GGUF is 98 MB
# and one call carries at most 64 MiB), run from the repo root there:
#
#   scripts/cuda/lease.sh stage1   carry .device/a: gguf.part.aa or gguf.xz.aa (+
#       llamacpp.tar.xz, + gemma3.gguf, + candela-base.xz) keeps the first half of the
#       model (and the synthetic gemma3, and a base build to compare with) under /root
#       and, when the llama.cpp source is there, starts building its llama-bench with
#       CUDA in the background (~5 min).
#   scripts/cuda/lease.sh stage2   carry .device/b: gguf.part.ab (or gguf.xz.ab), model.sha256, candela.xz
#       puts the model together and checks its sha256, then: `candela doctor` (fused path,
#       tensor path and CPU on the same prompts), the CPU greedy reference and
#       gpu_check.sh on the fused build, window_check.py when stage 1 kept gemma3.gguf, and
#       llama-bench (tg128, pp512) on the same card.
#   scripts/cuda/lease.sh batch    carry .device/b (as stage2): `candela doctor` (and the
#       base build's, when stage 1 kept one), then candela (--max-batch 32) over HTTP at
#       1, 8 and 32 streams and greedy batched vs single-stream vs CPU (batch_check.py).
#   scripts/cuda/lease.sh peer     (after batch, nothing carried) llama-bench,
#       llama-batched-bench -npl 1,8,32 and llama-server --parallel 32 over HTTP at 1, 8
#       and 32 streams (batch_check.py) on the same card.
#   scripts/cuda/lease.sh kquant   carry .device/k: candela.xz, llamacpp.tar.xz,
#       gguf-0.19.0-py3-none-any.whl, tok.gguf (gen_synth.py --write-tokenizer), and the
#       scripts (K=.device/k: this script, gen_synth.py, batch_check.py, tier_check.py and
#       candela_server.py beside it when run from a copy). Starts the llama.cpp build in the background,
#       writes the synthetic qwen-mix (Qwen2.5-Coder-0.5B's Q4_K_M types) and llama3-8b
#       (Llama-3-8B's shape in Q4_K_M) with gen_synth.py, then `candela doctor` on both:
#       fused K-quant path, tensor path and CPU on the same prompts, batched against
#       single-stream; then tier_check.py on qwen-mix (session caches moving GPU -> host
#       RAM -> disk and back, against a server where nothing moves).
#   scripts/cuda/lease.sh kpeer    (right after kquant, nothing carried) llama-bench
#       (tg128, pp512), llama-batched-bench -npl 1,8,32 on both files, then candela and
#       llama-server over HTTP at 1, 8 and 32 streams on llama3-8b (batch_check.py).
#   scripts/cuda/lease.sh synth    carry .device/s: candela.xz, the gguf 0.19.0 wheel, tok.gguf
#       one call, no llama.cpp: writes smollm2-shape (the default model's shape and types,
#       random weights) with gen_synth.py, then `candela doctor` and candela over HTTP
#       (1/8/32 streams, time to first token, batched vs single-stream greedy), then time
#       to first token again with the wide prefill and the flash attention off.
#   scripts/cuda/lease.sh verify   carry .device/s (as synth): one call, no llama.cpp: writes
#       smollm2-shape, qwen-mix and llama3-8b with gen_synth.py, then `candela doctor` on
#       each (llama3-8b without the CPU reference; NOCPU=1: none), then each again with
#       CANDELA_CUDA_MM_TC=0 (the batched mat-mats as dp4a kernels: batched against
#       single-stream bits) while the call has time.
#   scripts/cuda/lease.sh tc       carry .device/s (as synth): one call, no llama.cpp: writes
#       smollm2-shape and llama3-8b, `candela doctor` on both (no CPU reference), again
#       with CANDELA_CUDA_TC_SMEM=1 (staged weights for every matrix), then candela over HTTP at 1, 8 and 32 streams on both (smollm2-shape also batched vs
#       single-stream greedy), and llama3-8b's streams again with CANDELA_CUDA_MM_TC=0
#       (the dp4a mat-mats) to compare (BASE=0: not).
#   scripts/cuda/lease.sh defaults carry .device/s (as synth): one short call: writes qwen-mix,
#       `candela doctor` on it (no CPU reference), then candela over HTTP on it with its
#       defaults (wide prefill of a K-quant model; time to first token at 16/512/4000
#       tokens, 1 and 8 streams, greedy batched vs single-stream), and the time to first
#       token again with CANDELA_CUDA_WIDE=0.
#   scripts/cuda/lease.sh peer1    carry .device/s plus llamacpp.tar.xz in it: candela and
#       llama.cpp in ONE call on synthetic files written there (smollm2-shape, then
#       llama3-8b while the call has time): the llama.cpp build runs in the background
#       while candela is measured (doctor --no-cpu, HTTP at 1/8/32 streams with the
#       engine's step times, time to first token, greedy batched vs single-stream), then
#       llama-bench, llama-batched-bench -npl 1,8,32 and llama-server over HTTP on the same
#       files. Same-lease ratios without the real model's two calls.
#   scripts/cuda/lease.sh peer8b   carry .device/s (as peer1): one call on smollm2-shape and
#       llama3-8b: `candela doctor` on both (every tensor-core variant's kernel times, batched
#       against single-stream bits), candela over HTTP at 1/8/32 streams on both, then
#       llama-server --parallel 32 over HTTP and llama-batched-bench -npl 1,8,32 on
#       llama3-8b, built in the background meanwhile. MODELS=llama3-8b: the 8B alone;
#       TTFT=16,32,512: both servers' time to first token at those prompt lengths too.
#   scripts/cuda/lease.sh split    carry .device/s (as synth): split decode attention, one call:
#       `candela doctor` (with the CPU) on smollm2-shape with its defaults and with
#       CANDELA_CUDA_ATTN_SPLIT=0 (split against unsplit logits, batched against
#       single-stream bits, kernel costs at position 1024), candela over HTTP (1 and 8
#       streams, greedy batched vs single-stream), then `candela doctor --no-cpu` on
#       llama3-8b while the call has time.
#   scripts/cuda/lease.sh tune     carry .device/s (as synth): `candela doctor --no-cpu` on
#       smollm2-shape and llama3-8b, printing the tuning lines: whole steps (graph alone
#       against with the host's part), mat-vecs at 2/4/8 blocks per multiprocessor, split
#       attention with 1/2/4/8 blocks a head, the batched kernels, batched against single bits
#       (MODELS=..., LINES=a grep pattern; FORCED="CANDELA_CUDA_...=1 ..." runs each
#       model's doctor again with those switches, FORCED_MODELS=... on those only,
#       FLINES=its grep pattern; DEFAULT=0 skips the doctors without them; QUICK=1: the
#       doctor's --quick, about a third of the time).
#   scripts/cuda/lease.sh deep     carry .device/s (as peer1): batched decode deep into the
#       context against llama.cpp: `candela doctor --quick` on smollm2-shape and llama3-8b
#       (its "at position 1993-2000" lines: 8 and 32 sequences each prefilled with ~2,000
#       tokens, then stepped together for 32 steps; the short-prompt rates beside them),
#       then llama-batched-bench -npp 128,2000 -ntg 32 -npl 8,32 on the same files
#       (MODELS=...; FORCED="CANDELA_CUDA_...=1": each doctor again with those switches).
#   scripts/cuda/lease.sh ab       carry .device/s plus candela-base.xz in it: `candela
#       doctor --no-cpu` with the base build, then the carried one, on smollm2-shape and
#       llama3-8b (MODELS=..., LINES=a grep pattern for the lines printed; all by default).
#   scripts/cuda/lease.sh wide8b   carry .device/s (as peer1): `candela doctor --prefill` on
#       llama3-8b and smollm2-shape (every way of prefilling: batched steps, tensor path,
#       wide with f16 or int8 GEMMs), candela's time to first token over HTTP on each
#       (defaults; on llama3-8b also CANDELA_CUDA_WIDE=0), then llama-bench pp512/pp4000
#       and llama-server's time to first token on them, built in the background meanwhile
#       (MODELS=..., PEER=0: no llama.cpp, HTTP_ENV="CANDELA_CUDA_...=..." in place of the
#       defaults, several runs separated by '|' (empty: the defaults), DOCTOR_ENV="..." the doctor's prefill lines again with those settings).
#   scripts/cuda/lease.sh pack     carry .device/s (as synth): packed wide passes, one call:
#       candela over HTTP at 8 and 32 streams (max time to first token, aggregate decode)
#       on each model (MODELS=..., default llama3-8b smollm2-shape) with its defaults and
#       with CANDELA_CUDA_WIDE_PACK=0 (packing off), then `candela doctor --prefill`'s packed lines
#       (several prompts in one pass, packed against batched steps or each alone).
#   scripts/cuda/lease.sh prof     carry .device/s: Nsight Compute on `candela doctor --quick`
#       (KERNELS=regex, COUNT=n, MODEL_NAME=llama3-8b, SECTIONS="..."), report in $OUT.
#   scripts/cuda/lease.sh window   carry .device/w: candela.xz, gemma3.gguf
#       `candela doctor` and window_check.py on the synthetic gemma3 alone (~1 min): the
#       sliding-window KV cache on CUDA against one-pass prefills and against the CPU.
#
# On the dev machine: scripts/cuda/build.sh; xz -T0 -c .device/candela >.device/b/candela.xz;
# scripts/cuda/llamacpp_tar.sh (prunes llama.cpp's source to what llama-bench needs);
# python3 tests/fixtures/synth/gen_synth.py .device/a --only gemma3 (window 32, 5.5 MB).
#
# Nothing here filters what the checks print: each prints its figures, or a line saying
# why one was not measured (and the server log's last lines on a failure).
set -uo pipefail
OUT="${OUT:-./lease-out}"
mkdir -p "$OUT" /root/cdata/models
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
MODEL=/root/cdata/models/SmolLM2-135M-Instruct.Q4_1.gguf
A="${A:-.device/a}"
B="${B:-.device/b}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# The default model from its two halves: raw (gguf.part.aa/ab) or xz-compressed
# (gguf.xz.aa/ab: `xz -c model | split -b 48M - gguf.xz.`), checked against model.sha256.
assemble() {
    if [ -f /root/gguf.xz.aa ]; then
        cat /root/gguf.xz.aa $B/gguf.xz.ab | xz -dc >"$MODEL" || return 1
    else
        cat /root/gguf.part.aa $B/gguf.part.ab >"$MODEL" || return 1
    fi
    (cd /root/cdata/models && sha256sum -c "$OLDPWD/$B/model.sha256")
}

# Unpack llama.cpp's pruned source ($1) into /root/lcp and build llama-bench,
# llama-batched-bench and llama-server with CUDA in the background (at nice $2, $3 jobs);
# /root/lcp/build.done gets the build's exit status. Where llamacpp-bin.tar.xz lies
# beside the source (scripts/cuda/llamacpp_bin.sh: the same three built here, statically
# linked but for the CUDA libraries) and its binaries load on this machine, they are
# used instead and nothing is built (the build takes 3-6 minutes of a call).
start_llamacpp_build() {
    rm -rf /root/lcp && mkdir -p /root/lcp/build/bin || return 1
    local bin
    bin="$(dirname "$1")/llamacpp-bin.tar.xz"
    if [ -f "$bin" ] && tar xJf "$bin" -C /root/lcp/build/bin; then
        if ! /root/lcp/build/bin/llama-bench --help >/dev/null 2>&1 && [ -d /usr/local/cuda/lib64 ]; then
            export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        fi
        if /root/lcp/build/bin/llama-bench --help >/dev/null 2>&1; then
            echo 0 >/root/lcp/build.done
            echo "llama.cpp: the prebuilt binaries ($bin)"
            return 0
        fi
        echo "llama.cpp: the prebuilt binaries do not run here; building"
        ldd /root/lcp/build/bin/llama-bench | grep 'not found'
        rm -rf /root/lcp/build && mkdir -p /root/lcp
    fi
    tar xJf "$1" -C /root/lcp || return 1
    (cd /root/lcp && setsid bash -c "cmake -S src -B build -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DCMAKE_BUILD_TYPE=Release \
        >build.log 2>&1 && nice -n $2 cmake --build build --target llama-bench llama-batched-bench \
        llama-server -j $3 >>build.log 2>&1; echo \$? >build.done" </dev/null >/dev/null 2>&1 &)
    echo "llama.cpp build started in the background"
}

# candela (--max-batch 32) over HTTP on model $2 at port $3 with the environment settings
# in $4 (may be empty), measured by batch_check.py under the name $1 (the rest: its
# arguments); the server's log is $OUT/candela_$1.log.
candela_http() {
    local name=$1 model=$2 port=$3 envs=$4
    shift 4
    env $envs /root/candela --device cuda --model "$model" --port "$port" --max-batch 32 \
        --queue-size 64 --ctx-size 8192 --data-dir "/tmp/c$port" >"$OUT/candela_$name.log" 2>&1 &
    local cp=$!
    python3 "$HERE/batch_check.py" --url "http://127.0.0.1:$port" --out "$OUT" --name "$name" "$@" \
        || tail -n 5 "$OUT/candela_$name.log"
    kill $cp; wait $cp 2>/dev/null
}

# `candela doctor --no-cpu --tokens 32` on the synthetic file /root/synth/$1.gguf, its
# output in $OUT/doctor_$1.txt, the lines matching the pattern $2 printed.
synth_doctor() {
    local bin="${BIN:-/root/candela}" tag="$1${TAG:-}"
    echo "== doctor ($bin) on $1 at ${SECONDS} s"
    $bin doctor --device cuda --model /root/synth/$1.gguf --data-dir /tmp/cdoctor \
        --tokens 32 --no-cpu ${QUICK:+--quick} 2>"$OUT/doctor_$tag.err" >"$OUT/doctor_$tag.txt" || tail -n 20 "$OUT/doctor_$tag.err"
    grep -E "$2" "$OUT/doctor_$tag.txt"
}

# The synthetic modes' start (carry .device/s): the gguf wheel, the binary, then the
# named models written by gen_synth.py into /root/synth.
synth_models() {
    local S="${S:-.device/s}"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $S/gguf-*.whl || return 1
    xz -dc $S/candela.xz >/root/candela && chmod +x /root/candela
    mkdir -p /root/synth
    # Files an earlier call on this (still warm) machine wrote are kept.
    local todo=()
    for m in "$@"; do [ -f /root/synth/$m.gguf ] || todo+=("$m"); done
    [ ${#todo[@]} = 0 ] && { echo "reusing /root/synth: $*"; return 0; }
    PYTHONPATH=/tmp/site python3 "$HERE/../../tests/fixtures/synth/gen_synth.py" /root/synth \
        --tokenizer-from $S/tok.gguf --only "${todo[@]}" | tail -n 1
}

case "${1:-}" in
stage1)
    cp $A/gguf.part.aa /root/gguf.part.aa 2>/dev/null || cp $A/gguf.xz.aa /root/gguf.xz.aa
    [ -f $A/gemma3.gguf ] && cp $A/gemma3.gguf /root/gemma3.gguf
    # A build to compare with in the same lease (`batch` runs its doctor too).
    [ -f $A/candela-base.xz ] && xz -dc $A/candela-base.xz >/root/candela-base && chmod +x /root/candela-base
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    if [ -f $A/llamacpp.tar.xz ]; then
        start_llamacpp_build $A/llamacpp.tar.xz 19 14
    fi
    ;;
stage2)
    assemble || exit 1
    xz -dc $B/candela.xz >/root/candela && chmod +x /root/candela
    BIN=/root/candela
    echo "== doctor (fused: graph + programmatic dependent launch)"
    "$BIN" doctor --device cuda --model "$MODEL" --data-dir /root/cdata --tokens 128 2>"$OUT/doctor.err" | tee "$OUT/doctor.txt"
    if [ "${VARIANTS:-0}" = 1 ]; then
        echo "== doctor, fused lines: graph without PDL, then no graph"
        CANDELA_CUDA_PDL=0 "$BIN" doctor --device cuda --model "$MODEL" --data-dir /root/cdata --tokens 128 2>>"$OUT/doctor.err" | grep -E "fused|8 seq|kernels" | tee "$OUT/doctor_nopdl.txt"
        CANDELA_CUDA_GRAPH=0 "$BIN" doctor --device cuda --model "$MODEL" --data-dir /root/cdata --tokens 128 2>>"$OUT/doctor.err" | grep -E "fused|8 seq" | tee "$OUT/doctor_nograph.txt"
    fi
    tail -n 5 "$OUT/doctor.err"
    if [ "${SKIP_CHECK:-0}" != 1 ]; then
        echo "== CPU greedy reference (the same binary, --device cpu)"
        DEVICE=cpu PORT=8091 CANDELA_BIN=$BIN OUT=$OUT/cpu "$HERE/gpu_check.sh" \
            --reference /root/cpu_ref.json 2>&1 | tee "$OUT/cpu_ref.log"
        echo "== gpu_check on CUDA"
        CANDELA_BIN=$BIN REF=/root/cpu_ref.json OUT=$OUT "$HERE/gpu_check.sh" 2>&1 | tee "$OUT/gpu_check.log"
    fi
    if [ -f /root/gemma3.gguf ]; then
        echo "== window_check: synthetic gemma3, CUDA against the CPU"
        python3 "$HERE/window_check.py" --bin "$BIN" --model /root/gemma3.gguf --out "$OUT"
    fi
    if [ -d /root/lcp ]; then
        for _ in $(seq 1 60); do [ -f /root/lcp/build.done ] && break; sleep 5; done
        echo "== llama.cpp build exit: $(cat /root/lcp/build.done 2>/dev/null || echo 'not finished')"
        tail -n 3 /root/lcp/build.log
        LB=/root/lcp/build/bin/llama-bench
        [ -x $LB ] && $LB -m "$MODEL" -ngl 99 -fa 0,1 -p 512 -n 128 -r 5 2>&1 | tee "$OUT/llama_bench.txt" | grep -E "^\||build"
    fi
    ;;
batch)
    # Like stage2, for many streams: doctor (batched against single-stream), then
    # candela over HTTP with batch_check.py at 1, 8 and 32 streams.
    assemble || exit 1
    xz -dc $B/candela.xz >/root/candela && chmod +x /root/candela
    BIN=/root/candela
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
    # The in-process figures (GPU-bound) run while stage 1's llama.cpp build (nice 19)
    # finishes; everything over HTTP waits for it.
    [ -d /root/lcp ] && echo "== llama.cpp build still running: $([ -f /root/lcp/build.done ] && echo no || echo yes)"
    echo "== doctor"
    "$BIN" doctor --device cuda --model "$MODEL" --data-dir /root/cdata --tokens 128 2>"$OUT/doctor.err" | tee "$OUT/doctor.txt"
    tail -n 3 "$OUT/doctor.err"
    if [ -x /root/candela-base ]; then
        echo "== doctor of the base build (stage 1's candela-base.xz), many-sequence lines"
        /root/candela-base doctor --device cuda --model "$MODEL" --data-dir /root/cdata --tokens 128 \
            2>>"$OUT/doctor.err" | tee "$OUT/doctor_base.txt" | grep -E "sequence|fused path|prefill"
    fi
    if [ -d /root/lcp ]; then
        t0=$(date +%s)
        for _ in $(seq 1 100); do [ -f /root/lcp/build.done ] && break; sleep 3; done
        echo "== waited $(( $(date +%s) - t0 )) s for the llama.cpp build (exit $(cat /root/lcp/build.done 2>/dev/null))"
    fi
    echo "== CPU greedy reference (the same binary, --device cpu)"
    DEVICE=cpu PORT=8091 CANDELA_BIN=$BIN OUT=$OUT/cpu "$HERE/gpu_check.sh" \
        --reference /root/cpu_ref.json 2>&1 | tail -n 2
    echo "== candela over HTTP (--max-batch 32)"
    "$BIN" --device cuda --model "$MODEL" --port 8090 --max-batch 32 --queue-size 64 \
        --ctx-size 8192 --data-dir /tmp/cbatch >"$OUT/candela.log" 2>&1 &
    CP=$!
    python3 "$HERE/batch_check.py" --url http://127.0.0.1:8090 --greedy --ref /root/cpu_ref.json \
        --ttft 16,512,4000 --out "$OUT" --name candela
    kill $CP; wait $CP 2>/dev/null
    ;;
peer)
    # llama.cpp on the same card, after `batch` (the model and the build from stage1).
    if [ -d /root/lcp ]; then
        for _ in $(seq 1 90); do [ -f /root/lcp/build.done ] && break; sleep 5; done
        echo "== llama.cpp build exit: $(cat /root/lcp/build.done 2>/dev/null || echo 'not finished')"
        tail -n 3 /root/lcp/build.log
        LB=/root/lcp/build/bin
        [ -x $LB/llama-bench ] && $LB/llama-bench -m "$MODEL" -ngl 99 -fa 0,1 -p 512 -n 128 -r 5 2>&1 | tee "$OUT/llama_bench.txt" | grep -E "^\||build"
        [ -x $LB/llama-batched-bench ] && $LB/llama-batched-bench -m "$MODEL" -ngl 99 -fa on -c 16384 \
            -b 2048 -ub 512 -npp 128 -ntg 128 -npl 1,8,32 2>&1 | tee "$OUT/llama_batched.txt" | grep -E "^\||build"
        if [ -x $LB/llama-server ]; then
            echo "== llama-server --parallel 32 over HTTP"
            $LB/llama-server -m "$MODEL" -ngl 99 -fa on --parallel 32 -c 16384 --port 8092 \
                >"$OUT/llama_server.log" 2>&1 &
            LP=$!
            python3 "$HERE/batch_check.py" --url http://127.0.0.1:8092 --out "$OUT" --name llama-server
            kill $LP; wait $LP 2>/dev/null
            echo "== llama-server --parallel 1 -c 8192: time to first token"
            $LB/llama-server -m "$MODEL" -ngl 99 -fa on -c 8192 --port 8093 \
                >"$OUT/llama_server_ttft.log" 2>&1 &
            LP=$!
            python3 "$HERE/batch_check.py" --url http://127.0.0.1:8093 --streams "" --ttft 16,512,4000 \
                --out "$OUT" --name llama-server-p1
            kill $LP; wait $LP 2>/dev/null
        fi
    fi
    ;;
kquant)
    K="${K:-.device/k}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    start_llamacpp_build $K/llamacpp.tar.xz 5 12
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $K/gguf-*.whl || exit 1
    xz -dc $K/candela.xz >/root/candela && chmod +x /root/candela
    mkdir -p /root/synth
    t0=$(date +%s)
    PYTHONPATH=/tmp/site python3 "$HERE/gen_synth.py" /root/synth --tokenizer-from $K/tok.gguf \
        --only qwen-mix llama3-8b --verbose | grep -v "blk\.[1-9]" | tee "$OUT/synth.txt" || exit 1
    echo "== wrote the synthetic models in $(( $(date +%s) - t0 )) s"
    for m in qwen-mix llama3-8b; do
        n=64; [ $m = llama3-8b ] && n=32
        echo "== doctor on $m ($n tokens)"
        /root/candela doctor --device cuda --model /root/synth/$m.gguf --data-dir /tmp/cdoctor \
            --tokens $n 2>"$OUT/doctor_$m.err" | tee "$OUT/doctor_$m.txt" || tail -n 20 "$OUT/doctor_$m.err"
    done
    # Session KV tiers on this GPU (the fused K-quant path's caches moving GPU -> host
    # RAM -> disk and back) against a server where nothing moves.
    if [ -f "$HERE/tier_check.py" ] && [ -f "$HERE/candela_server.py" ]; then
        echo "== tier_check on qwen-mix"
        timeout 150 python3 "$HERE/tier_check.py" --bin /root/candela --model /root/synth/qwen-mix.gguf \
            --device cuda --out "$OUT/tiers" 2>&1 | tee "$OUT/tier_check.txt" | tail -n 40
        echo "tier_check exit: ${PIPESTATUS[0]}"
    else
        echo "== tier_check: not measured: tier_check.py or candela_server.py is not beside lease.sh"
    fi
    # Variants, while the call has time (each line says what it changed): the mat-mat
    # kernels allowed 200 KB of shared memory (fewer passes over the weights at 32
    # sequences), and Q4_K in the wide Q4_1 layout (8 bytes of scales per 32, not 3).
    for v in "CANDELA_CUDA_MM_SMEM_KB=200 qwen-mix" "CANDELA_CUDA_MM_SMEM_KB=200 llama3-8b" \
        "CANDELA_CUDA_Q4K_WIDE=1 llama3-8b"; do
        [ $SECONDS -gt 330 ] && { echo "== variant $v: not measured: the call is at ${SECONDS} s"; continue; }
        set -- $v
        echo "== variant $1 on $2"
        env "$1" /root/candela doctor --device cuda --model /root/synth/$2.gguf --data-dir /tmp/cdoctor \
            --tokens 32 2>>"$OUT/doctor_variants.err" | grep -E "fused|sequences|step sum" | tee -a "$OUT/doctor_variants.txt"
    done
    ;;
kpeer)
    for _ in $(seq 1 100); do [ -f /root/lcp/build.done ] && break; sleep 3; done
    echo "== llama.cpp build exit: $(cat /root/lcp/build.done 2>/dev/null || echo 'not finished')"
    tail -n 2 /root/lcp/build.log
    LB=/root/lcp/build/bin
    for m in qwen-mix llama3-8b; do
        M=/root/synth/$m.gguf
        [ -x $LB/llama-bench ] && $LB/llama-bench -m $M -ngl 99 -fa 1 -p 512 -n 128 -r 3 2>&1 | tee "$OUT/llama_bench_$m.txt" | grep -E "^\||build"
        [ -x $LB/llama-batched-bench ] && $LB/llama-batched-bench -m $M -ngl 99 -fa on -c 16384 \
            -b 2048 -ub 512 -npp 128 -ntg 128 -npl 1,8,32 2>&1 | tee "$OUT/llama_batched_$m.txt" | grep -E "^\||build"
    done
    M=/root/synth/llama3-8b.gguf
    echo "== candela over HTTP on llama3-8b (--max-batch 32)"
    /root/candela --device cuda --model $M --port 8090 --max-batch 32 --queue-size 64 --ctx-size 8192 \
        --data-dir /tmp/cbatch >"$OUT/candela.log" 2>&1 &
    CP=$!
    python3 "$HERE/batch_check.py" --url http://127.0.0.1:8090 --out "$OUT" --name candela || tail -n 5 "$OUT/candela.log"
    kill $CP; wait $CP 2>/dev/null
    if [ -x $LB/llama-server ]; then
        echo "== llama-server --parallel 32 over HTTP on llama3-8b"
        $LB/llama-server -m $M -ngl 99 -fa on --parallel 32 -c 16384 --port 8092 >"$OUT/llama_server.log" 2>&1 &
        LP=$!
        python3 "$HERE/batch_check.py" --url http://127.0.0.1:8092 --out "$OUT" --name llama-server
        kill $LP; wait $LP 2>/dev/null
    fi
    ;;
synth)
    # One call, no llama.cpp: the default model's shape and types with random weights
    # (gen_synth.py smollm2-shape, written here), `candela doctor` on it, then candela
    # over HTTP (1/8/32 streams, time to first token, batched vs single-stream greedy).
    # Carry .device/s: candela.xz, gguf-0.19.0-py3-none-any.whl, tok.gguf.
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
    synth_models smollm2-shape || exit 1
    M=/root/synth/smollm2-shape.gguf
    echo "== doctor"
    /root/candela doctor --device cuda --model $M --data-dir /tmp/cdoctor --tokens 64 \
        2>"$OUT/doctor.err" | tee "$OUT/doctor.txt" || tail -n 20 "$OUT/doctor.err"
    echo "== candela over HTTP (--max-batch 32)"
    /root/candela --device cuda --model $M --port 8090 --max-batch 32 --queue-size 64 \
        --ctx-size 8192 --data-dir /tmp/cbatch >"$OUT/candela.log" 2>&1 &
    CP=$!
    python3 "$HERE/batch_check.py" --url http://127.0.0.1:8090 --greedy --ttft 16,512,4000 \
        --out "$OUT" --name candela || tail -n 5 "$OUT/candela.log"
    kill $CP; wait $CP 2>/dev/null
    # Long prompts without the wide prefill and the flash attention (the tensor path's
    # matmul-softmax-matmul), time to first token.
    echo "== candela over HTTP, CANDELA_CUDA_FLASH=0 CANDELA_CUDA_WIDE=0"
    CANDELA_CUDA_FLASH=0 CANDELA_CUDA_WIDE=0 /root/candela --device cuda --model $M --port 8094 \
        --max-batch 32 --queue-size 64 --ctx-size 8192 --data-dir /tmp/cplain >"$OUT/candela_plain.log" 2>&1 &
    CP=$!
    python3 "$HERE/batch_check.py" --url http://127.0.0.1:8094 --streams "" \
        --ttft 16,512,4000 --out "$OUT/plain" --name candela-plain || tail -n 5 "$OUT/candela_plain.log"
    kill $CP; wait $CP 2>/dev/null
    ;;
verify)
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
    t0=$(date +%s)
    synth_models smollm2-shape qwen-mix llama3-8b || exit 1
    echo "== wrote the synthetic models in $(( $(date +%s) - t0 )) s"
    for m in smollm2-shape qwen-mix llama3-8b; do
        flags="--tokens 64"; [ $m = llama3-8b ] && flags="--tokens 32"
        { [ $m = llama3-8b ] || [ "${NOCPU:-0}" = 1 ]; } && flags="$flags --no-cpu"
        echo "== doctor on $m ($flags) at ${SECONDS} s"
        /root/candela doctor --device cuda --model /root/synth/$m.gguf --data-dir /tmp/cdoctor \
            $flags 2>"$OUT/doctor_$m.err" | tee "$OUT/doctor_$m.txt" || tail -n 20 "$OUT/doctor_$m.err"
    done
    # The batched step's dp4a mat-mats (the tensor-core ones are the default on sm_80+):
    # batched against single-stream bits.
    for m in smollm2-shape qwen-mix llama3-8b; do
        [ $SECONDS -gt 480 ] && { echo "== CANDELA_CUDA_MM_TC=0 on $m: not measured: the call is at ${SECONDS} s"; continue; }
        echo "== doctor on $m, CANDELA_CUDA_MM_TC=0, at ${SECONDS} s"
        CANDELA_CUDA_MM_TC=0 /root/candela doctor --device cuda --model /root/synth/$m.gguf \
            --data-dir /tmp/cdoctor --tokens 32 --no-cpu 2>>"$OUT/doctor_tc_$m.err" \
            | tee "$OUT/doctor_tc_$m.txt" | grep -E "fused path|sequence|bit-identical|batched kernels, (8|32|64) rows,"
    done
    ;;
tc)
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
    synth_models smollm2-shape llama3-8b || exit 1
    for m in smollm2-shape llama3-8b; do
        synth_doctor $m "fused path|sequence|bit-identical|batched kernels, (8|32) rows|kernels at pos 32"
    done
    # The shared-memory-staged kernels forced for every matrix: batched against
    # single-stream bits.
    for m in smollm2-shape llama3-8b; do
        echo "== doctor on $m, CANDELA_CUDA_TC_SMEM=1, at ${SECONDS} s"
        CANDELA_CUDA_TC_SMEM=1 /root/candela doctor --device cuda --model /root/synth/$m.gguf \
            --data-dir /tmp/cdoctor --tokens 32 --no-cpu 2>>"$OUT/doctor_tcs_$m.err" \
            | tee "$OUT/doctor_tcs_$m.txt" | grep -E "sequence|bit-identical"
    done
    port=8100
    runs=("smollm2-shape --greedy" "llama3-8b")
    [ "${BASE:-1}" = 1 ] && runs+=("llama3-8b CANDELA_CUDA_MM_TC=0")
    for run in "${runs[@]}"; do
        set -- $run
        m=$1; shift
        greedy=""; envs=""
        for a in "$@"; do case $a in --greedy) greedy=--greedy;; *=*) envs="$envs $a";; esac; done
        [ $SECONDS -gt 500 ] && { echo "== HTTP on $m$envs: not measured: the call is at ${SECONDS} s"; continue; }
        port=$((port + 1))
        echo "== candela over HTTP on $m$envs (--max-batch 32) at ${SECONDS} s"
        candela_http "candela-$m${envs// /}" /root/synth/$m.gguf $port "$envs" $greedy
    done
    ;;
defaults)
    synth_models qwen-mix || exit 1
    M=/root/synth/qwen-mix.gguf
    echo "== doctor on qwen-mix at ${SECONDS} s"
    /root/candela doctor --device cuda --model $M --data-dir /tmp/cdoctor --tokens 32 --no-cpu \
        2>"$OUT/doctor_qwen-mix.err" >"$OUT/doctor_qwen-mix.txt" || tail -n 20 "$OUT/doctor_qwen-mix.err"
    grep -E "sequence|bit-identical|batched kernels, (8|32) rows(, tensor|, us)" "$OUT/doctor_qwen-mix.txt"
    for v in "" "CANDELA_CUDA_WIDE=0"; do
        echo "== candela over HTTP on qwen-mix ${v:-(defaults)} at ${SECONDS} s"
        env $v /root/candela --device cuda --model $M --port 8110 --max-batch 32 --ctx-size 8192 \
            --data-dir /tmp/cdef$SECONDS >"$OUT/candela_def$SECONDS.log" 2>&1 &
        CP=$!
        if [ -z "$v" ]; then
            python3 "$HERE/batch_check.py" --url http://127.0.0.1:8110 --streams 1,8 --greedy \
                --ttft 16,512,4000 --out "$OUT" --name qwen-mix-defaults || tail -n 5 "$OUT"/candela_def*.log
        else
            python3 "$HERE/batch_check.py" --url http://127.0.0.1:8110 --streams "" \
                --ttft 16,512,4000 --out "$OUT" --name qwen-mix-nowide || tail -n 5 "$OUT"/candela_def*.log
        fi
        kill $CP; wait $CP 2>/dev/null
    done
    grep -h -i "wide\|flash\|fused" "$OUT"/candela_def*.log | head -n 6
    ;;
peer1)
    S="${S:-.device/s}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
    start_llamacpp_build $S/llamacpp.tar.xz 10 12 || exit 1
    synth_models smollm2-shape || exit 1
    M=/root/synth/smollm2-shape.gguf
    echo "== doctor on smollm2-shape at ${SECONDS} s"
    /root/candela doctor --device cuda --model $M --data-dir /tmp/cdoctor --tokens 64 --no-cpu \
        2>"$OUT/doctor.err" >"$OUT/doctor.txt" || tail -n 20 "$OUT/doctor.err"
    grep -E "fused path|sequence|host side|bit-identical|batched kernels, (8|32) rows|kernels at pos 32|fused wide" "$OUT/doctor.txt"
    echo "== candela over HTTP on smollm2-shape (--max-batch 32) at ${SECONDS} s"
    /root/candela --device cuda --model $M --port 8090 --max-batch 32 --queue-size 64 \
        --ctx-size 8192 --data-dir /tmp/cpeer1 >"$OUT/candela.log" 2>&1 &
    CP=$!
    python3 "$HERE/batch_check.py" --url http://127.0.0.1:8090 --greedy --ttft 16,512,4000 \
        --out "$OUT" --name candela || tail -n 5 "$OUT/candela.log"
    kill $CP; wait $CP 2>/dev/null
    grep -m1 "gpu paths" "$OUT/candela.log"
    t0=$SECONDS
    for _ in $(seq 1 120); do [ -f /root/lcp/build.done ] && break; sleep 3; done
    echo "== waited $(( SECONDS - t0 )) s for the llama.cpp build (exit $(cat /root/lcp/build.done 2>/dev/null || echo 'not finished'))"
    LB=/root/lcp/build/bin
    if [ -x $LB/llama-server ]; then
        $LB/llama-bench -m $M -ngl 99 -fa 1 -p 512,4000 -n 128 -r 3 2>&1 | tee "$OUT/llama_bench.txt" | grep -E "^\||build"
        $LB/llama-batched-bench -m $M -ngl 99 -fa on -c 16384 -b 2048 -ub 512 -npp 128 -ntg 128 \
            -npl 1,8,32 2>&1 | tee "$OUT/llama_batched.txt" | grep -E "^\||build"
        echo "== llama-server --parallel 32 over HTTP at ${SECONDS} s"
        $LB/llama-server -m $M -ngl 99 -fa on --parallel 32 -c 16384 --port 8092 >"$OUT/llama_server.log" 2>&1 &
        LP=$!
        python3 "$HERE/batch_check.py" --url http://127.0.0.1:8092 --out "$OUT" --name llama-server
        kill $LP; wait $LP 2>/dev/null
        echo "== llama-server --parallel 1: time to first token at ${SECONDS} s"
        $LB/llama-server -m $M -ngl 99 -fa on -c 8192 --port 8093 >"$OUT/llama_server_ttft.log" 2>&1 &
        LP=$!
        python3 "$HERE/batch_check.py" --url http://127.0.0.1:8093 --streams "" --ttft 16,512,4000 \
            --out "$OUT" --name llama-server-p1
        kill $LP; wait $LP 2>/dev/null
    else
        echo "llama.cpp: not measured: no llama-server built"; tail -n 5 /root/lcp/build.log
    fi
    # The 8B shape, while the call has time (writing it takes ~30 s, loading ~20 s).
    if [ $SECONDS -lt 330 ] && [ -x $LB/llama-server ]; then
        synth_models llama3-8b || exit 1
        M=/root/synth/llama3-8b.gguf
        echo "== llama3-8b: candela over HTTP at ${SECONDS} s"
        /root/candela --device cuda --model $M --port 8094 --max-batch 32 --queue-size 64 \
            --ctx-size 8192 --data-dir /tmp/cpeer8 >"$OUT/candela8b.log" 2>&1 &
        CP=$!
        python3 "$HERE/batch_check.py" --url http://127.0.0.1:8094 --out "$OUT" --name candela-8b
        kill $CP; wait $CP 2>/dev/null
        echo "== llama3-8b: llama-server --parallel 32 at ${SECONDS} s"
        $LB/llama-server -m $M -ngl 99 -fa on --parallel 32 -c 16384 --port 8095 >"$OUT/llama_server8b.log" 2>&1 &
        LP=$!
        python3 "$HERE/batch_check.py" --url http://127.0.0.1:8095 --out "$OUT" --name llama-server-8b
        kill $LP; wait $LP 2>/dev/null
        $LB/llama-batched-bench -m $M -ngl 99 -fa on -c 16384 -b 2048 -ub 512 -npp 128 -ntg 128 \
            -npl 1,8,32 2>&1 | tee "$OUT/llama_batched8b.txt" | grep -E "^\||build"
    else
        echo "== llama3-8b: not measured: the call is at ${SECONDS} s"
    fi
    ;;
peer8b)
    S="${S:-.device/s}"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
    start_llamacpp_build $S/llamacpp.tar.xz 10 12 || exit 1
    MODELS="${MODELS:-smollm2-shape llama3-8b}"
    synth_models $MODELS || exit 1
    for m in $MODELS; do
        synth_doctor $m "fused path|sequence|bit-identical|batched kernels|kernels at pos 32"
    done
    port=8120
    for m in $MODELS; do
        port=$((port + 1))
        echo "== candela over HTTP on $m (--max-batch 32) at ${SECONDS} s"
        greedy=""; [ $m = smollm2-shape ] && greedy=--greedy
        candela_http "candela-$m" /root/synth/$m.gguf $port "" $greedy ${TTFT:+--ttft $TTFT}
    done
    t0=$SECONDS
    for _ in $(seq 1 120); do [ -f /root/lcp/build.done ] && break; sleep 3; done
    echo "== waited $(( SECONDS - t0 )) s for the llama.cpp build (exit $(cat /root/lcp/build.done 2>/dev/null || echo 'not finished'))"
    LB=/root/lcp/build/bin
    M=/root/synth/llama3-8b.gguf
    if [ -x $LB/llama-server ]; then
        echo "== llama3-8b: llama-server --parallel 32 at ${SECONDS} s"
        $LB/llama-server -m $M -ngl 99 -fa on --parallel 32 -c 16384 --port 8129 >"$OUT/llama_server8b.log" 2>&1 &
        LP=$!
        python3 "$HERE/batch_check.py" --url http://127.0.0.1:8129 --out "$OUT" --name llama-server-8b \
            ${TTFT:+--ttft $TTFT}
        kill $LP; wait $LP 2>/dev/null
        echo "== llama3-8b: llama-batched-bench at ${SECONDS} s"
        $LB/llama-batched-bench -m $M -ngl 99 -fa on -c 16384 -b 2048 -ub 512 -npp 128 -ntg 128 \
            -npl 1,8,32 2>&1 | tee "$OUT/llama_batched8b.txt" | grep -E "^\||build"
    else
        echo "llama.cpp: not measured: no llama-server built"; tail -n 5 /root/lcp/build.log
    fi
    ;;
split)
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
    synth_models smollm2-shape || exit 1
    M=/root/synth/smollm2-shape.gguf
    for v in "" "CANDELA_CUDA_ATTN_SPLIT=0"; do
        echo "== doctor on smollm2-shape ${v:-(defaults)} at ${SECONDS} s"
        d="$OUT/doctor_split${v:+_off}"
        env $v /root/candela doctor --device cuda --model $M --data-dir /tmp/cdoctor --tokens 64 \
            2>"$d.err" >"$d.txt" || tail -n 20 "$d.err"
        grep -hE "fused path|sequence|bit-identical|^prefill +(100|512) tokens: |kernels at pos (32|1024)|attention in" "$d.txt"
    done
    echo "== candela over HTTP on smollm2-shape at ${SECONDS} s"
    candela_http candela-split $M 8130 "" --greedy --streams 1,8
    if [ $SECONDS -lt 150 ]; then
        synth_models llama3-8b || exit 1
        synth_doctor llama3-8b "sequence|bit-identical|^prefill +512 tokens: |kernels at pos (32|1024)|attention in"
    else
        echo "== llama3-8b: not measured: the call is at ${SECONDS} s"
    fi
    ;;
wide8b)
    # Long-prompt prefill against llama.cpp in one call (carry .device/s as peer1):
    # llama.cpp builds in the background while `candela doctor --prefill` times every way
    # of prefilling on each model (MODELS, default llama3-8b smollm2-shape), then candela's
    # time to first token over HTTP (prompt lengths TTFT, default 16,512,4000) on each
    # with its defaults (HTTP_ENV="..." in their place) and, on llama3-8b, with the wide
    # prefill off (WIDE_OFF=0: not); then llama-bench (pp512,
    # pp4000) and llama-server's time to first token on the same files (PEER=0: none).
    S="${S:-.device/s}"
    MODELS="${MODELS:-llama3-8b smollm2-shape}"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
    [ "${PEER:-1}" = 0 ] || start_llamacpp_build $S/llamacpp.tar.xz 10 12 || exit 1
    synth_models $MODELS || exit 1
    for m in $MODELS; do
        echo "== doctor --prefill on $m at ${SECONDS} s"
        /root/candela doctor --device cuda --model /root/synth/$m.gguf --data-dir /tmp/cdoctor \
            --prefill 2>"$OUT/doctor_pf_$m.err" | tee "$OUT/doctor_pf_$m.txt" | grep -E "^prefill|^(8|32) prompts" \
            || tail -n 20 "$OUT/doctor_pf_$m.err"
        # DOCTOR_ENV="CANDELA_CUDA_...=..." : the prefill lines again with those settings.
        if [ -n "${DOCTOR_ENV:-}" ]; then
            echo "== doctor --prefill on $m with $DOCTOR_ENV at ${SECONDS} s"
            env $DOCTOR_ENV /root/candela doctor --device cuda --model /root/synth/$m.gguf \
                --data-dir /tmp/cdoctor --prefill 2>"$OUT/doctor_pf2_$m.err" | tee "$OUT/doctor_pf2_$m.txt" \
                | grep -E "^prefill" || tail -n 20 "$OUT/doctor_pf2_$m.err"
        fi
    done
    port=8140
    for m in $MODELS; do
        # HTTP_ENV: settings in place of the defaults; several runs separated by '|'
        # (an empty entry: the defaults).
        IFS='|' read -r -a envs <<<"${HTTP_ENV:-}"; [ ${#envs[@]} = 0 ] && envs=("")
        [ $m = llama3-8b ] && [ "${WIDE_OFF:-1}" != 0 ] && envs+=("CANDELA_CUDA_WIDE=0")
        for v in "${envs[@]}"; do
            port=$((port + 1))
            echo "== candela over HTTP on $m ${v:-(defaults)} at ${SECONDS} s"
            candela_http "$(echo "candela-$m-${v:-defaults}" | tr '=' '_')" /root/synth/$m.gguf $port "$v" \
                --streams "" --ttft "${TTFT:-16,512,4000}"
        done
    done
    [ "${PEER:-1}" = 0 ] && exit 0
    t0=$SECONDS
    for _ in $(seq 1 150); do [ -f /root/lcp/build.done ] && break; sleep 3; done
    echo "== waited $(( SECONDS - t0 )) s for the llama.cpp build (exit $(cat /root/lcp/build.done 2>/dev/null || echo 'not finished'))"
    LB=/root/lcp/build/bin
    if [ -x $LB/llama-server ]; then
        for m in $MODELS; do
            M=/root/synth/$m.gguf
            echo "== llama-bench on $m at ${SECONDS} s"
            $LB/llama-bench -m $M -ngl 99 -fa 1 -p 512,4000 -n 0 -r 3 2>&1 | tee "$OUT/llama_bench_$m.txt" | grep -E "^\||build"
            port=$((port + 1))
            echo "== llama-server --parallel 1 on $m: time to first token at ${SECONDS} s"
            $LB/llama-server -m $M -ngl 99 -fa on -c 8192 --port $port >"$OUT/llama_server_ttft_$m.log" 2>&1 &
            LP=$!
            python3 "$HERE/batch_check.py" --url http://127.0.0.1:$port --streams "" --ttft 16,512,4000 \
                --out "$OUT" --name llama-server-$m-p1
            kill $LP; wait $LP 2>/dev/null
        done
    else
        echo "llama.cpp: not measured: no llama-server built"; tail -n 5 /root/lcp/build.log
    fi
    ;;
prof)
    # Nsight Compute on `candela doctor --quick` (carry .device/s as synth): the first
    # COUNT (default 6) launches of the kernels whose names match KERNELS (a regex,
    # default tcs32w_: the 32-sequence batched mat-mats, one layer's and the next's first)
    # on MODEL_NAME (default llama3-8b), with
    # the sections in SECTIONS. The report: $OUT/ncu_<model>.txt.
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
    m="${MODEL_NAME:-llama3-8b}"
    synth_models $m || exit 1
    NCU="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)"
    [ -n "$NCU" ] || { echo "ncu: not found"; exit 1; }
    secs=()
    for x in ${SECTIONS:-SpeedOfLight Occupancy LaunchStats WarpStateStats ComputeWorkloadAnalysis MemoryWorkloadAnalysis SchedulerStats InstructionStats}; do secs+=(--section "$x"); done
    echo "== $NCU on doctor --quick ($m), kernels ${KERNELS:-tcs32w_} at ${SECONDS} s"
    "$NCU" --clock-control none --kernel-name "regex:${KERNELS:-tcs32w_}" --launch-count "${COUNT:-6}" \
        "${secs[@]}" /root/candela doctor --device cuda --model /root/synth/$m.gguf --data-dir /tmp/cdoctor \
        --tokens 32 --no-cpu --quick >"$OUT/ncu_$m.txt" 2>"$OUT/ncu_$m.err" || tail -n 20 "$OUT/ncu_$m.err"
    grep -E "^  [a-z_0-9]+ ?\(|Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|Stall|L1/TEX Hit|L2 Hit|Executed Ipc A" "$OUT/ncu_$m.txt" | head -n 200
    ;;
pack)
    MODELS="${MODELS:-llama3-8b smollm2-shape}"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
    synth_models $MODELS || exit 1
    port=8200
    for m in $MODELS; do
        for v in "" "CANDELA_CUDA_WIDE_PACK=0"; do
            port=$((port + 1))
            echo "== candela over HTTP on $m ${v:-(defaults)} at ${SECONDS} s"
            candela_http "$(echo "candela-$m-${v:-defaults}" | tr '=' '_')" /root/synth/$m.gguf \
                $port "$v" --streams 8,32
        done
        echo "== doctor --prefill on $m at ${SECONDS} s"
        /root/candela doctor --device cuda --model /root/synth/$m.gguf --data-dir /tmp/cdoctor \
            --prefill 2>"$OUT/doctor_pack_$m.err" | tee "$OUT/doctor_pack_$m.txt" \
            | grep -E "^(8|32) prompts" || tail -n 20 "$OUT/doctor_pack_$m.err"
    done
    ;;
tune)
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
    synth_models ${MODELS:-smollm2-shape llama3-8b} || exit 1
    [ "${DEFAULT:-1}" = 0 ] || for m in ${MODELS:-smollm2-shape llama3-8b}; do
        synth_doctor $m "${LINES:-sequence|bit-identical|decode step|kernels at pos|mat-vecs at most|attention in|batched kernels, (8|32) rows, us}"
    done
    # FORCED="CANDELA_CUDA_X=1 ...": each model's doctor again with those switches (its
    # bit-identity lines then check the forced kernels).
    if [ -n "${FORCED:-}" ]; then
        for m in ${FORCED_MODELS:-${MODELS:-smollm2-shape llama3-8b}}; do
            (export $FORCED; echo "== with $FORCED"; TAG=_forced synth_doctor $m "${FLINES:-sequence|bit-identical|batched kernels, (8|32) rows, us}")
        done
    fi
    ;;
deep)
    S="${S:-.device/s}"
    MODELS="${MODELS:-smollm2-shape llama3-8b}"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
    start_llamacpp_build $S/llamacpp.tar.xz 10 12 || exit 1
    synth_models $MODELS || exit 1
    for m in $MODELS; do
        QUICK=1 synth_doctor $m "sequence|position|attention in"
        [ -z "${FORCED:-}" ] || (export $FORCED; echo "== with $FORCED"
            QUICK=1 TAG=_forced synth_doctor $m "sequence|position|attention in")
    done
    t0=$SECONDS
    for _ in $(seq 1 120); do [ -f /root/lcp/build.done ] && break; sleep 3; done
    echo "== waited $(( SECONDS - t0 )) s for the llama.cpp build (exit $(cat /root/lcp/build.done 2>/dev/null || echo 'not finished'))"
    for m in $MODELS; do
        echo "== llama-batched-bench on $m at ${SECONDS} s"
        /root/lcp/build/bin/llama-batched-bench -m /root/synth/$m.gguf -ngl 99 -fa on -c 68000 \
            -b 2048 -ub 512 -npp 128,2000 -ntg 32 -npl 8,32 2>&1 \
            | tee "$OUT/llama_batched_deep_$m.txt" | grep -E "^\||rror"
    done
    ;;
ab)
    # The carried build against a base build (candela-base.xz beside it), doctor by
    # doctor on the same files; the tensor path's logit gaps double as a check that two
    # builds meant to compute the same bits do.
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
    synth_models ${MODELS:-smollm2-shape llama3-8b} || exit 1
    xz -dc ${S:-.device/s}/candela-base.xz >/root/candela-base && chmod +x /root/candela-base
    for m in ${MODELS:-smollm2-shape llama3-8b}; do
        BIN=/root/candela-base TAG=_base synth_doctor $m "${LINES:-.}"
        synth_doctor $m "${LINES:-.}"
    done
    ;;
window)
    W="${W:-.device/w}"
    xz -dc $W/candela.xz >/root/candela && chmod +x /root/candela
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    echo "== doctor on the synthetic gemma3 (its sliding-window cache check last)"
    /root/candela doctor --device cuda --model $W/gemma3.gguf --data-dir /tmp/cdoctor \
        --tokens 40 2>"$OUT/doctor_window.err" || tail -n 20 "$OUT/doctor_window.err"
    echo "== window_check, f16 cache (the default): CUDA against the CPU"
    python3 "$HERE/window_check.py" --bin /root/candela --model $W/gemma3.gguf --out "$OUT"
    echo "== window_check, f32 cache on both"
    python3 "$HERE/window_check.py" --bin /root/candela --model $W/gemma3.gguf --out "$OUT/f32" \
        --a "--device cuda --kv-dtype f32" --b "--device cpu --kv-dtype f32"
    ;;
*)
    echo "usage: $0 stage1|stage2|batch|peer|kquant|kpeer|synth|verify|tc|defaults|peer1|peer8b|split|tune|deep|ab|window" >&2
    exit 2
    ;;
esac
