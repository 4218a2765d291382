#!/usr/bin/env bash
# The evidence runs that want a GPU, in one go, each under a time limit, all of them under TOTAL_S seconds (default
# 570). Results under $OUT if set, else bench/results/on_gpu; each part's output is kept in its .log as it goes.
#   1. decode: GPT2-BSBR's decoding step against stock GPT-2 (SDPA), GPT-2-small shapes, bfloat16, after prompts of
#      1k and 16k tokens: ms/token, host synchronisations per token (CUDA's sync debug mode) and a profile of one
#      round (bench/bench_bsbr.py --decode-only --profile). With OLD_GRAFTLM=<folder holding another graftlm>, the
#      same at 1k for that graftlm too (a before/after of a change).
#   2. base: the default offline base (experiments/offline_base.py: 6 x 256, 2,000 steps of 8 x 1024 tokens).
#   3. bsbr_lm: experiments/bsbr_evidence.py --parts lm with its defaults (1024-token windows, chunk 128, 300 steps,
#      seeds 0 1 2) on that base.
#   4. dfa_allocation: experiments/dfa_allocation.py with its defaults on that base.
#   5. bridge_ablation: experiments/bridge_ablation.py with its defaults on that base.
# Run from the repository root, in a Python environment where graftlm and its test extras are installed and torch
# sees the GPU:
#   bash experiments/on_gpu.sh            # or: PARTS="decode base bsbr_lm" TOTAL_S=300 bash experiments/on_gpu.sh
# SMOKE=1 runs every part at toy sizes (a CPU check that the script runs; its numbers mean nothing). PYTHON names the
# interpreter (default: python).
set -u
PY="${PYTHON:-python}"
export PYTHONUNBUFFERED=1
OUT_DIR="${OUT:-bench/results/on_gpu}"
PARTS="${PARTS:-decode base bsbr_lm dfa_allocation bridge_ablation}"
END=$((SECONDS + ${TOTAL_S:-570}))
mkdir -p "$OUT_DIR"
"$PY" -c "import torch, transformers, graftlm; print('torch', torch.__version__, 'transformers', transformers.__version__,
'graftlm', graftlm.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"

if [ "${SMOKE:-0}" = 1 ]; then
    DECODE=(--n-layer 2 --n-embd 64 --n-head 4 --vocab-size 512 --chunk-size 16 --lengths 64 128 --decode-steps 16
            --repeats 1)
    BASE=(--n-layer 2 --n-embd 64 --n-head 2 --steps 20 --seq-len 64 --batch-size 2)
    ON_BASE=(--base n_layer=2 n_embd=64 n_head=2 steps=20 seq_len=64 batch_size=2)
    BSBR=(--chunk-size 8 --seq-len 64 --steps 4 --seeds 0 --train-chars 20000 --eval-docs 2 --doc-tokens 128)
    DFA=(--steps 4 --seq-len 64 --seeds 0 --train-chars 20000 --eval-docs 2 --doc-tokens 128 --bootstrap 20)
    BRIDGE=(--steps 4 --seeds 0 --train-pairs 40 --max-source-length 32)
else
    DECODE=(--size small --dtype bfloat16 --lengths 1024 16384 --decode-steps 128 --repeats 2)
    BASE=() ON_BASE=() BSBR=() DFA=() BRIDGE=()
fi

status=0
run() {  # run NAME SECONDS COMMAND...: at most SECONDS (and what is left of TOTAL_S), output kept in NAME.log
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    case " $PARTS " in *" ${name%%_old} "*) ;; *) return ;; esac
    [ $((END - SECONDS - 10)) -lt "$limit" ] && limit=$((END - SECONDS - 10))
    if [ "$limit" -lt 20 ]; then echo "== $name: skipped, ${limit} s left"; status=1; return; fi
    echo "== $name (limit ${limit} s): $*"
    timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    tail -n 40 "$OUT_DIR/$name.log"
    echo "== $name: exit code $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
}

run decode 150 "$PY" bench/bench_bsbr.py "${DECODE[@]}" --decode-only --profile --output-dir "$OUT_DIR/decode"
if [ -n "${OLD_GRAFTLM:-}" ]; then
    run decode_old 60 env PYTHONPATH="$OLD_GRAFTLM${PYTHONPATH:+:$PYTHONPATH}" "$PY" bench/bench_bsbr.py \
        "${DECODE[@]}" --lengths "${DECODE_OLD_LENGTH:-1024}" --decode-only --output-dir "$OUT_DIR/decode_old"
fi
run base 240 "$PY" experiments/offline_base.py "${BASE[@]}"
run bsbr_lm 300 "$PY" experiments/bsbr_evidence.py --parts lm "${ON_BASE[@]}" "${BSBR[@]}" \
    --output-dir "$OUT_DIR/bsbr_evidence"
run dfa_allocation 240 "$PY" experiments/dfa_allocation.py "${ON_BASE[@]}" "${DFA[@]}" \
    --output-dir "$OUT_DIR/dfa_allocation"
run bridge_ablation 400 "$PY" experiments/bridge_ablation.py "${ON_BASE[@]}" "${BRIDGE[@]}" \
    --output-dir "$OUT_DIR/bridge_ablation"
exit $status
