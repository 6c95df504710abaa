#!/usr/bin/env bash
# One accelerator check: every benchmark of benchmarks/ at accelerator sizes, merged into one
# JSON (device, versions, and per step its exit status, wall time and the benchmark's own JSON).
#
#   benchmarks/accelerator_check.sh OUT_DIR            # GPU / TPU: accelerator sizes
#   benchmarks/accelerator_check.sh --quick OUT_DIR    # toy sizes (CPU; what the test runs)
#
# Writes OUT_DIR/accelerator_check.json (and each step's stdout/stderr, memory.md). Every step
# runs under its own time limit (STEP_LIMITS below, 8 min 20 s in all), so the whole check ends
# within 9 minutes whatever the machine; a step that fails or runs out of time is recorded
# ("rc", "stderr_tail") and the next one runs. Steps:
#   ntk_speed        exact eNTK, ours vs neural-tangents (every form), blocked, Jacobian-free
#   selection_speed  projected features / JVP scores vs a LoRA train step and the torch.func peer
#   model_speed      forward / forward+backward vs PyTorch transformers (+ peft)
#   memory_table     per-device memory of the 8B-shaped programs (compiled at 1 and 2 layers)
#   model_profile    the Flax forward + LoRA backward op by op (jax.profiler joined with the HLO)
set -uo pipefail

QUICK=0
if [[ "${1:-}" == "--quick" ]]; then QUICK=1; shift; fi
OUT=${1:?usage: benchmarks/accelerator_check.sh [--quick] OUT_DIR}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export NTK_JAX_NO_PROGRESS=1

if [[ $QUICK == 1 ]]; then
  NTK_ARGS="--quick"
  SEL_ARGS="--quick"
  MODEL_ARGS="--quick"
  MEM_ARGS="--quick --out $OUT/memory.md"
  PROF_ARGS="--quick"
  STEP_LIMITS=(300 300 300 300 300)
else
  NTK_ARGS="--n 64 --repeats 5 --big-n 4096 --block-size 512 --seq-len 64"
  SEL_ARGS="--n 4096 --sizes 4096,16384 --batch-size 256 --repeats 3"
  MODEL_ARGS="--batch 16 --seq-len 512 --rounds 5"
  MEM_ARGS="--meshes 1x1 --ranks 8,128 --seq-len 1024 --cache $OUT/memory_rows.json --out $OUT/memory.md"
  PROF_ARGS="--size larger --seq-len 512 --batch 16 --top 30"
  STEP_LIMITS=(150 150 90 70 40)
fi

# ACCELERATOR_CHECK_LIMIT_S: one limit for every step instead (tests use it to check that a
# step out of time is recorded and the check goes on).
if [[ -n "${ACCELERATOR_CHECK_LIMIT_S:-}" ]]; then
  STEP_LIMITS=("$ACCELERATOR_CHECK_LIMIT_S" "$ACCELERATOR_CHECK_LIMIT_S" "$ACCELERATOR_CHECK_LIMIT_S" "$ACCELERATOR_CHECK_LIMIT_S"
               "$ACCELERATOR_CHECK_LIMIT_S")
fi

STEPS=(ntk_speed selection_speed model_speed memory_table model_profile)
ARGS=("$NTK_ARGS" "$SEL_ARGS" "$MODEL_ARGS" "$MEM_ARGS" "$PROF_ARGS")
for i in "${!STEPS[@]}"; do
  name=${STEPS[$i]}
  start=$(date +%s.%N)
  # shellcheck disable=SC2086
  timeout "${STEP_LIMITS[$i]}" python "$ROOT/benchmarks/$name.py" ${ARGS[$i]} \
    > "$OUT/$name.stdout" 2> "$OUT/$name.stderr"
  rc=$?
  end=$(date +%s.%N)
  echo "{\"rc\": $rc, \"wall_s\": $(python -c "print(round($end - $start, 2))"), \"limit_s\": ${STEP_LIMITS[$i]}, \"args\": \"${ARGS[$i]}\"}" \
    > "$OUT/$name.status"
  echo "[accelerator_check] $name: rc=$rc" >&2
done

python - "$OUT" "$QUICK" "${STEPS[@]}" <<'EOF'
import json, os, platform, shutil, subprocess, sys

out, quick, steps = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
import jax

report = {"quick": quick, "host": platform.node(), "python": platform.python_version(),
          "jax_version": jax.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()],
          "device_kind": jax.devices()[0].device_kind, "steps": {}}
if shutil.which("nvidia-smi"):
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                       capture_output=True, text=True)
    report["nvidia_smi"] = q.stdout.strip().splitlines()
for name in steps:
    step = json.load(open(os.path.join(out, f"{name}.status")))
    text = open(os.path.join(out, f"{name}.stdout")).read()
    try:
        step["result"] = json.loads(text) if text.strip() else None
    except json.JSONDecodeError as e:
        step["result"] = None
        step["parse_error"] = f"{name}.stdout is not one JSON object: {e}"
    if step["rc"] != 0:
        step["stderr_tail"] = open(os.path.join(out, f"{name}.stderr")).read()[-3000:]
    report["steps"][name] = step
report["ok"] = all(s["rc"] == 0 and s["result"] is not None for s in report["steps"].values())
with open(os.path.join(out, "accelerator_check.json"), "w") as f:
    json.dump(report, f, indent=1)
print(os.path.join(out, "accelerator_check.json"))
EOF
