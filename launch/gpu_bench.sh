#!/usr/bin/env bash
# DiT-XL/2 train-step benchmarks and the GPU attention-kernel checks, on one bare H100/H200
# machine without network. Run from the repository root:
#
#     bash launch/gpu_bench.sh [OUTDIR]          # default OUTDIR: $OUT, else runs/gpu_bench
#
# The machine is expected to have jax (CUDA), flax, optax, orbax, chex, scipy, pillow, tqdm,
# safetensors, scikit-learn and pytest. The project's other pure-Python dependencies
# (ml-collections, tensorboardX) are installed with --no-deps from wheels in $WHEELS (default
# .whl/) when missing; fetch them on a machine with network:
#
#     pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#         ml_collections==1.1.0 tensorboardX==2.6.5
#
# What it runs (compiled DiT-XL/2 steps, blocks scanned, each in its own process with a time
# limit, then the kernel checks; about 6 minutes on an H200), by name:
#   plain256   plain train step, 256 px (256 tokens), per-device batch 128, cuDNN attention
#   scm256     sCD step (configs/bench/dit_xl2.py:scm), 256 px, batch 128: cuDNN for the gradient
#              pass, the fused Pallas JVP attention for the tangent (the config's XLA tangent if
#              that fails)
#   plain512   plain train step, 512 px (1024 tokens), batch 32, cuDNN attention
#   scm512     sCD step, 512 px, batch 32, fused JVP attention
#   dmd2_256   DMD2 generator and fake-score steps (student, fake score + GAN head, teacher),
#              256 px, per-device batch 32, blocks rematerialised (the config's remat=full)
#   sid_256    SiD generator and fake-score steps, 256 px, batch 32
#   plain256_unrolled, scm256_unrolled   the 256-px steps with the blocks unrolled (not in the
#              default list: each compiles for 1-3 minutes)
#   scm256_separate, scm512_separate   scm256 / scm512 with objective.shared_primal=False (a
#              tangent pass, then a second student forward with gradient): the baseline of the
#              shared pass's saving, side by side on the same machine (not in the default list)
#   sct256     scm256 in sCT mode (objective.mode=sct: no teacher forward, the single-sample
#              velocity): the step of the plain-JAX "sCM-style JVP step" anchor, which runs no
#              teacher (375 img/s, 1.38x its plain step: an sCD step is at least 5 forward-
#              equivalents, 1.67x a plain step; not in the default list)
#   plain256_dots, scm256_dots   plain256 / scm256 with model.remat=dots_saveable: the scanned
#              blocks keep only matmul outputs for the backward and recompute the elementwise
#              ops (on CPU: 56% fewer temporary bytes than the scanned step without remat; not
#              in the default list)
#   plain256_stacked, scm256_stacked, scm512_stacked   the plain256 / scm256 / scm512 steps
#              with the stacked (scanned) parameter layout fully unrolled
#              (model.scan_unroll=28): on CPU the same temporaries as unrolled blocks with a
#              third of their compile time (one optimizer update per stacked leaf); whether it
#              also runs at the unrolled step's speed is what these rows measure (not in the
#              default list)
#   kernels    pytest tests/test_attention.py -k on_gpu: every kernel against float32 XLA
#              attention in forward, gradient and JVP, then per-kernel timings at DiT-XL/2 shapes
# Environment: PYTHON (the interpreter, default python3), WHEELS, RUNS (the names above, in
# order; default "plain256 scm256 plain512 scm512 dmd2_256 sid_256 kernels"), STEPS (timed
# steps, 10), SCAN, EXTRA_ARGS (below), LIMIT_SCALE (an integer multiplying every run's time
# limit, default 1: e.g. 2 for the unrolled rows on a machine that starts slowly).
# Output: OUTDIR/bench.md (the table), OUTDIR/bench.jsonl (launch.bench's JSON per run),
# OUTDIR/<run>.log, OUTDIR/kernels.log, OUTDIR/device.txt.
set -u
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-runs/gpu_bench}}
WHEELS=${WHEELS:-.whl}
PYTHON=${PYTHON:-python3}     # the interpreter with jax (on the GPU machines: python3)
mkdir -p "$OUTDIR"

if ! "$PYTHON" -c "import ml_collections, tensorboardX" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/distill-site "$WHEELS"/*.whl || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/distill-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
STEPS=${STEPS:-10}
# Blocks are scanned here so that the four DiT-XL/2 steps compile in seconds and the script
# ends within 8 minutes; SCAN=False measures the unrolled (faster, slower to compile) steps.
SCAN=${SCAN:-True}
# Extra launch.bench arguments for every run (a dry run on CPU: JAX_PLATFORMS=cpu
# EXTRA_ARGS="--config.model.num_layers=1 --config.model.attention=xla ...").
EXTRA_ARGS=${EXTRA_ARGS:-}
LIMIT_SCALE=${LIMIT_SCALE:-1}
case $LIMIT_SCALE in ''|*[!0-9]*|0) echo "launch/gpu_bench.sh: LIMIT_SCALE must be a positive integer, got '$LIMIT_SCALE'"; exit 2 ;; esac

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" -c "import jax, jaxlib, flax, optax, orbax.checkpoint as o; \
print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"; } 2>&1 | tee "$OUTDIR/device.txt"

echo "| run | model | phase | step ms | img/s | MFU | peak GiB | compile s |" > "$OUTDIR/bench.md"
echo "|---|---|---|---|---|---|---|---|" >> "$OUTDIR/bench.md"

# bench NAME LIMIT_S CONFIG_ARG [--config.k=v ...]: one launch.bench process; a failure (OOM, a
# kernel that does not compile, the time limit) is logged and the script goes on.
bench() {
  local name=$1 limit=$(( $2 * LIMIT_SCALE )) arg=$3
  shift 3
  echo "== $name: $arg $*"
  timeout "$limit" "$PYTHON" -m launch.bench --config "configs/bench/dit_xl2.py:$arg" \
    --random_teacher --steps "$STEPS" --warmup 2 --config.model.scan_blocks="$SCAN" "$@" $EXTRA_ARGS > "$OUTDIR/$name.log" 2>&1
  local rc=$?
  local json
  json=$(tail -n 1 "$OUTDIR/$name.log")
  if [ $rc -ne 0 ] || [ "${json:0:1}" != "{" ]; then
    local why
    why=$(grep -m1 -E 'Error|error|RESOURCE_EXHAUSTED' "$OUTDIR/$name.log")
    [ $rc -eq 124 ] && why="time limit ${limit} s; last line: $(tail -n 1 "$OUTDIR/$name.log")"
    echo "   FAILED (exit $rc): $(echo "$why" | cut -c1-300)"
    echo "| $name | $* | - | failed (exit $rc) | | | | |" >> "$OUTDIR/bench.md"
    return 1
  fi
  # One JSON line (with the run's name and arguments) to bench.jsonl, one table row per phase.
  echo "$json" | "$PYTHON" -c "
import json, sys
r = json.loads(sys.stdin.read()); r['run'] = '$name'; r['args'] = sys.argv[1:]
with open('$OUTDIR/bench.jsonl', 'a') as f:
  f.write(json.dumps(r) + '\\n')
peak = r.get('peak_memory_bytes') or 0
m = r.get('model', {})
def layout(m):
  if not m.get('scan_blocks'):
    return 'unrolled'
  u = int(m.get('scan_unroll') or 1)
  return 'scanned' if u == 1 else f'scanned unroll={u}'
attn = (f\"attn={m.get('attention')} jvp={m.get('jvp_attention')} {m.get('dtype', '')} \"
        f\"{layout(m)} remat={m.get('remat', 'none')}\")
for phase, p in r['phases'].items():
  mfu = f\"{100 * p['mfu']:.1f}%\" if 'mfu' in p else '-'
  print(f\"| $name | {attn} | {phase} | {p['step_ms']:.1f} | \"
        f\"{p['img_per_s']:.1f} | {mfu} | {peak / 2**30:.1f} | {p['compile_s']:.0f} |\")
" "$@" | tee -a "$OUTDIR/bench.md"
}

kernels() {
  echo "== kernels: pytest tests/test_attention.py -k on_gpu"
  timeout 240 "$PYTHON" -m pytest tests/test_attention.py -k on_gpu -q -s -p no:cacheprovider \
    > "$OUTDIR/kernels.log" 2>&1
  echo "   exit $?: $(tail -n 1 "$OUTDIR/kernels.log")"
  grep '^{' "$OUTDIR/kernels.log" || true
}

# run NAME: one of the runs listed at the top (NAME LIMIT_S CONFIG_ARG [--config.k=v ...]).
run() {
  case $1 in
    plain256) bench plain256 150 denoise ;;
    scm256) bench scm256 180 scm --config.model.jvp_attention=pallas_jvp \
              || bench scm256_xla_jvp 180 scm ;;
    plain512) bench plain512 150 denoise,512 ;;
    scm512) bench scm512 180 scm,512 --config.model.jvp_attention=pallas_jvp ;;
    sct256) bench sct256 180 scm --config.model.jvp_attention=pallas_jvp \
              --config.objective.mode=sct ;;
    plain256_dots) bench plain256_dots 150 denoise --config.model.remat=dots_saveable ;;
    scm256_dots) bench scm256_dots 180 scm --config.model.jvp_attention=pallas_jvp \
              --config.model.remat=dots_saveable ;;
    scm256_separate) bench scm256_separate 180 scm --config.model.jvp_attention=pallas_jvp \
              --config.objective.shared_primal=False ;;
    scm512_separate) bench scm512_separate 180 scm,512 --config.model.jvp_attention=pallas_jvp \
              --config.objective.shared_primal=False ;;
    dmd2_256) bench dmd2_256 200 dmd2 ;;
    sid_256) bench sid_256 200 sid ;;
    plain256_stacked) bench plain256_stacked 200 denoise --config.model.scan_unroll=28 ;;
    scm256_stacked) bench scm256_stacked 240 scm --config.model.jvp_attention=pallas_jvp \
              --config.model.scan_unroll=28 ;;
    scm512_stacked) bench scm512_stacked 240 scm,512 --config.model.jvp_attention=pallas_jvp \
              --config.model.scan_unroll=28 ;;
    plain256_unrolled) SCAN=False bench plain256_unrolled 240 denoise ;;
    scm256_unrolled) SCAN=False bench scm256_unrolled 360 scm ;;
    kernels) kernels ;;
    *) echo "launch/gpu_bench.sh: unknown run '$1' in RUNS (expected plain256, scm256, plain512," \
         "scm512, dmd2_256, sid_256, plain256_unrolled, scm256_unrolled, scm256_separate," \
         "scm512_separate, plain256_dots, scm256_dots, sct256, plain256_stacked, scm256_stacked," \
         "scm512_stacked or kernels)"; return 2 ;;
  esac
}

for name in ${RUNS:-plain256 scm256 plain512 scm512 dmd2_256 sid_256 kernels}; do
  run "$name"
done

echo
cat "$OUTDIR/bench.md"
