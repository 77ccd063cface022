#!/usr/bin/env bash
# kvsweep's CUDA check: everything that only a GPU exercises, in one command, every figure into one folder.
#
#   bash benchmarks/gpu_check.sh [--out DIR]        # a machine with a CUDA GPU and the project installed
#   bash benchmarks/gpu_check.sh --dry-run          # the same steps on the CPU at tiny sizes (CI runs this)
#
# Steps (each its own log DIR/<step>.txt; DIR/summary.txt: exit code and seconds per step):
#   env         python, torch, CUDA device, Ray
#   tiny        builds the tiny preset (what the sweep trains on) on the CPU, beside the tests, timed
#   tests       the tests marked gpu (tests/test_gpu.py): packed vs alone, compiled vs eager (default and
#               reduce-overhead), bf16 autocast vs float32, the latent cache of every method vs the
#               training-time forward, half-precision cache bytes; on the CPU under --dry-run
#   sweep       python sweeps/vdproj.py --smoke-test with packed trials, with Ray, on fractions of the GPU;
#               its results and report under DIR/sweep and DIR/reports
#   throughput  benchmarks/throughput.py: eager, bf16, chunked loss, compiled, Ray workers sharing the GPU,
#               packs, trial start-up (Pythia-70M's architecture on the GPU; tiny under --dry-run)
#   decode      benchmarks/decode.py: latent-cache bytes and decode speed of each family at 75/50/25/12.5% of the base's
#               cache (2,048-token context on the GPU), and decode.json for kvsweep report --decode
# The steps run in that order whatever fails; the exit code is 1 when any failed. Under 8 minutes on an
# H100/H200 (most of it Ray start-ups and compiles).
set -uo pipefail
dry=0
out=gpu-check
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry=1 ;;
    --out) out=$2; shift ;;
    -h|--help) sed -n 2,20p "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$root"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
py=${PYTHON:-python3}
: > "$out/summary.txt"
failed=()

step() {  # step NAME SECONDS COMMAND...: run, log, time; a failure is recorded and the next step runs
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  rc=$?
  echo "$name rc=$rc $((SECONDS - start)) s" >> "$out/summary.txt"
  tail -n 40 "$out/$name.txt"
  echo "== $name rc=$rc in $((SECONDS - start)) s"
  [[ $rc == 0 ]] || failed+=("$name")
}

if [[ $dry == 1 ]]; then
  export KVSWEEP_TEST_DEVICE=cpu
  throughput=(--model tiny --device cpu --steps 1 --warmup 0 --pack 2 --ray 2 --val-samples 4 --batch 2 --seq-len 32)
  decode=(--device cpu --context 64 --new-tokens 4 --budgets 0.5,0.25 --repeats 1 --no-hf)
  sweep=(--pack 2)
else
  export KVSWEEP_TEST_DEVICE=${KVSWEEP_TEST_DEVICE:-cuda}
  throughput=(--model pythia-70m --device cuda --pack 8,32 --ray 8)
  decode=(--device cuda --context 2048 --new-tokens 128 --dtype bfloat16 --cache-dtype bfloat16 --budgets 0.75,0.5,0.25,0.125 --repeats 2)
  sweep=(--pack 4 --gpus-per-trial 0.25 --cpus-per-trial 2)
fi

step env 60 "$py" -c "
import platform, torch, ray, kvsweep
print('python', platform.python_version(), '| torch', torch.__version__, '| ray', ray.__version__, '| kvsweep', kvsweep.__file__)
print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA', '| test device', '$KVSWEEP_TEST_DEVICE')
if '$KVSWEEP_TEST_DEVICE'.startswith('cuda') and not torch.cuda.is_available():
    raise SystemExit('CUDA is not available: use --dry-run on a machine without a GPU')
"
# the tiny preset builds on the CPU while the tests use the GPU; the sweep waits for it
tiny_start=$SECONDS
timeout 600 "$py" -c "import time; from kvsweep.tiny import ensure_tiny; t = time.time(); print(ensure_tiny(), f'{time.time() - t:.1f} s')" \
  > "$out/tiny.txt" 2>&1 &
tiny_pid=$!
step tests 240 "$py" -m pytest -p no:cacheprovider -q -m gpu -rs tests/test_gpu.py
wait "$tiny_pid"; rc=$?
echo "tiny rc=$rc $((SECONDS - tiny_start)) s (beside the tests)" >> "$out/summary.txt"
echo "== tiny rc=$rc: $(tail -n 1 "$out/tiny.txt")"
[[ $rc == 0 ]] || failed+=(tiny)
step sweep 240 "$py" sweeps/vdproj.py --smoke-test "${sweep[@]}" --name gpu-check --storage "$out/sweep" --report-dir "$out/reports"
step throughput 300 "$py" benchmarks/throughput.py "${throughput[@]}"
step decode 200 "$py" benchmarks/decode.py "${decode[@]}" --json "$out/decode.json"

cat "$out/summary.txt"
if (( ${#failed[@]} )); then
  echo "gpu_check: failed: ${failed[*]} (logs in $out)"
  exit 1
fi
echo "gpu_check: all steps passed (logs in $out)"
