#!/usr/bin/env bash
# The GPU check of issue 18 in one command, on a fresh machine with an NVIDIA GPU; writes one JSON (and a log
# beside it):
#
#   bash scripts/device_check.sh [--out FILE] [--budget SECONDS] [--cpu]
#
# Steps, each time-boxed (timeout) so that one hang cannot eat the budget (default 480 s for everything):
#   env      a python that imports torch; what is missing (torch, triton, transformers, pytest, gguf: cec.engine.weights
#            imports it) installed from the wheels in $WHEELS (default .whl/ in the tree, e.g. from
#            `pip download --no-deps -d .whl gguf==0.19.0`) or, when a package index answers, from it (torch pinned
#            as in the Makefile); nothing is installed when everything imports
#   gpu      nvidia-smi and torch's view of the device
#   tests    the tests that are skipped without CUDA (files with a CUDA skip mark, and in them only the tests that
#            mark guards): the Triton kernels in bf16 against their references, shared scoring against naive
#   profile_llama3-8b, profile_gemma-7b
#            scripts/profile_prefix.py on random weights of those shapes in bf16: a 3000-token note and 375
#            questions of about 25 tokens; the naive modes timed on 48 of them and scaled; achieved TFLOP/s, the
#            ratio to a bf16 matmul timed in the same run, the speedups and the largest P(yes) difference
# The JSON says for each step whether it ran, its exit code, seconds and result, and checks the issue's targets.
# --cpu: the same steps on CPU with toy shapes (tiny-llama, tiny-gemma): a dry run of this script's logic.
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_FILE=$ROOT/runs/device_check/device_check.json
BUDGET=480
CPU=0
while (($#)); do
    case $1 in
        --out) OUT_FILE=$2; shift 2 ;;
        --budget) BUDGET=$2; shift 2 ;;
        --cpu) CPU=1; shift ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "device_check.sh: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case $BUDGET in ''|*[!0-9]*) echo "device_check.sh: error: --budget takes whole seconds, not $BUDGET" >&2; exit 2 ;; esac
mkdir -p "$(dirname "$OUT_FILE")" || exit 2
OUT_FILE=$(cd "$(dirname "$OUT_FILE")" && pwd)/$(basename "$OUT_FILE")
LOG=${OUT_FILE%.json}.log
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
RESERVE=15  # seconds kept for writing the JSON
: >"$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# one line per step: name, exit code, start, end, time limit; or name, "skipped", 0, 0, why
STEPS=$WORK/steps.tsv
: >"$STEPS"
step() {  # step NAME MAX_SECONDS CMD...: run CMD for at most MAX_SECONDS (less when the budget runs short)
    local name=$1 max=$2
    shift 2
    local left=$((BUDGET - RESERVE - ($(date +%s) - START)))
    local limit=$((max < left ? max : left))
    if ((limit < 20)); then
        printf '%s\tskipped\t0\t0\tthe budget had %s s left\n' "$name" "$left" >>"$STEPS"
        echo "=== $name: skipped, ${left}s of the budget left" >>"$LOG"
        return
    fi
    echo "=== $name (limit ${limit}s): $*" >>"$LOG"
    local t0 rc
    t0=$(date +%s.%N)
    (cd "$ROOT" && timeout --kill-after=10 "$limit" "$@") >>"$LOG" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$t0" "$(date +%s.%N)" "$limit" >>"$STEPS"
}

# --- env: a python with torch, and what is missing installed where possible
PY=
for p in "${PYTHON:-}" "$ROOT/.venv/bin/python" python3 python; do
    if [ -n "$p" ] && command -v "$p" >/dev/null 2>&1 && "$p" -c "import torch" >/dev/null 2>&1; then PY=$p; break; fi
done
if [ -z "$PY" ]; then
    for p in python3 python; do command -v "$p" >/dev/null 2>&1 && { PY=$p; break; }; done
fi
if [ -z "$PY" ]; then
    echo "device_check.sh: error: no python on this machine" >&2
    exit 1
fi
# the repo's packages without installing it: cec from the root, kernels/ under its import name cec_kernels
mkdir -p "$WORK/pkgs" && ln -s "$ROOT/kernels" "$WORK/pkgs/cec_kernels"
export PYTHONPATH=$ROOT:$WORK:$WORK/pkgs${PYTHONPATH:+:$PYTHONPATH}
NEED=${DEVICE_CHECK_NEED:-torch transformers pytest gguf}  # the variable: to try the install path
((CPU)) || [ -n "${DEVICE_CHECK_NEED:-}" ] || NEED="$NEED triton"
missing() {
    "$PY" -c 'import importlib.util, sys; print(" ".join(n for n in sys.argv[1:] if importlib.util.find_spec(n) is None))' $NEED
}
WHEELS=${WHEELS:-$ROOT/.whl}
env_t0=$(date +%s.%N)
MISSING=$(missing)
ENV_ACTION=none
env_rc=0
if [ -n "$MISSING" ]; then
    echo "=== env: missing $MISSING" >>"$LOG"
    declare -A PIN=([torch]=torch==2.13.0 [transformers]=transformers==5.24.0 [gguf]=gguf==0.19.0)
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        ENV_ACTION="wheels from $WHEELS"
        timeout 150 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$WORK/site" "$WHEELS"/*.whl >>"$LOG" 2>&1
        env_rc=$?
    elif timeout 20 "$PY" -m pip download -q --no-deps -d "$WORK/probe" pytest >>"$LOG" 2>&1; then
        ENV_ACTION="package index"
        timeout 150 "$PY" -m pip install -q --target "$WORK/site" $(for m in $MISSING; do echo "${PIN[$m]:-$m}"; done) \
            >>"$LOG" 2>&1
        env_rc=$?
    else
        ENV_ACTION="none possible: no wheels in $WHEELS and no package index"
        env_rc=1
    fi
    export PYTHONPATH=$WORK/site:$PYTHONPATH
fi
STILL_MISSING=$(missing)
printf 'env\t%s\t%s\t%s\t150\n' "$env_rc" "$env_t0" "$(date +%s.%N)" >>"$STEPS"

# --- gpu: what the machine has
step gpu 30 "$PY" -c '
import json, subprocess, sys
import torch
info = {"python": sys.executable, "python_version": sys.version.split()[0], "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(name=p.name, capability=list(torch.cuda.get_device_capability()), memory_gib=round(p.total_memory / 2**30, 1),
                multiprocessors=p.multi_processor_count)
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                         "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.TimeoutExpired) as e:
    info["nvidia_smi"] = f"not run: {e}"
print("GPU_INFO " + json.dumps(info))
'

# --- tests: the ones a CUDA skip mark guards
cat >"$WORK/cuda_only.py" <<'EOF'
"""pytest plugin: keep only the tests guarded by a skip mark that names CUDA or a GPU (the ones a CPU run skips)."""


def _needs_gpu(item):
    for mark in item.iter_markers("skipif"):
        text = " ".join(map(str, mark.args)) + " " + str(mark.kwargs.get("reason", ""))
        if "cuda" in text.lower() or "gpu" in text.lower():
            return True
    return False


def pytest_collection_modifyitems(config, items):
    keep = [i for i in items if _needs_gpu(i)]
    config.hook.pytest_deselected(items=[i for i in items if not _needs_gpu(i)])
    items[:] = keep
EOF
TEST_FILES=$(cd "$ROOT" && grep -l -i -E "skipif.*(cuda|gpu)" tests/test_*.py | tr '\n' ' ')
echo "$TEST_FILES" >"$WORK/test_files"
if [ -n "$TEST_FILES" ]; then
    # shellcheck disable=SC2086
    step tests 150 "$PY" -m pytest -q -p cuda_only -p no:cacheprovider --junitxml="$WORK/tests.xml" $TEST_FILES
else
    printf 'tests\tskipped\t0\t0\tno test file has a CUDA skip mark\n' >>"$STEPS"
fi

# --- the profiler on the two model shapes
if ((CPU)); then
    CONFIGS="tiny-llama tiny-gemma"
    ARGS="--device cpu --prefix-tokens 64 --questions 12 --question-tokens 8 --common-tokens 3 --naive-questions 6
          --head-rows 16 --threads 1"
else
    CONFIGS="llama3-8b gemma-7b"
    ARGS="--device cuda --dtype bf16 --prefix-tokens 3000 --questions 375 --question-tokens 25 --naive-questions 48"
fi
for c in $CONFIGS; do
    # shellcheck disable=SC2086
    step "profile_$c" 170 "$PY" scripts/profile_prefix.py --config "$c" $ARGS --json "$WORK/profile_$c.json"
done

# --- one JSON with everything
"$PY" - "$WORK" "$OUT_FILE" "$LOG" "$START" "$BUDGET" "$CPU" "$PY" "$MISSING" "$ENV_ACTION" "$STILL_MISSING" <<'EOF'
import json, os, re, sys, time
import xml.etree.ElementTree as ET

work, out_file, log, start, budget, cpu, py, missing, action, still = sys.argv[1:]
steps = {}
for line in open(os.path.join(work, "steps.tsv")):
    name, rc, t0, t1, limit = line.rstrip("\n").split("\t")
    if rc == "skipped":
        steps[name] = {"ran": False, "skipped": limit}
        continue
    rc = int(rc)
    steps[name] = {"ran": True, "rc": rc, "ok": rc == 0, "seconds": round(float(t1) - float(t0), 1),
                   "limit_seconds": int(limit), "timed_out": rc in (124, 137)}
text = open(log, errors="replace").read()
steps["env"]["result"] = {"python": py, "missing": missing.split(), "action": action, "still_missing": still.split()}
m = re.search(r"^GPU_INFO (.*)$", text, re.M)
if "gpu" in steps and m:
    steps["gpu"]["result"] = json.loads(m.group(1))
if steps.get("tests", {}).get("ran"):
    res = {"files": open(os.path.join(work, "test_files")).read().split()}
    xml = os.path.join(work, "tests.xml")
    if os.path.exists(xml):
        cases = ET.parse(xml).getroot().iter("testcase")
        res.update(passed=0, failed=0, skipped=0, failures=[])
        for case in cases:
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                res["failed"] += 1
                res["failures"].append({"test": case.get("classname", "") + "::" + case.get("name", ""),
                                        "message": (bad.get("message") or "")[:400]})
            elif case.find("skipped") is not None:
                res["skipped"] += 1
            else:
                res["passed"] += 1
    steps["tests"]["ok"] = steps["tests"]["rc"] in (0, 5)  # 5: no test selected
    steps["tests"]["result"] = res
targets = {}
for name, st in steps.items():
    path = os.path.join(work, name + ".json")
    if not name.startswith("profile_") or not os.path.exists(path):
        continue
    p = st["result"] = json.load(open(path))
    errors = {mode: r["error"] for mode, r in p.get("modes", {}).items() if "error" in r}
    t = {"shared_fraction_of_bf16_peak": p.get("flop_floor_ratio"), "speedup_vs_hf_naive": p.get("speedup_vs_hf_naive"),
         "speedup_vs_hf_reuse": p.get("speedup_vs_hf_reuse"), "max_abs_dp": p.get("max_abs_dp"),
         "fused_head_speedup": p.get("head", {}).get("speedup"), "mode_errors": errors}
    want = {"shared_fraction_of_bf16_peak": 0.5, "speedup_vs_hf_naive": 50, "speedup_vs_hf_reuse": 4}
    t["met"] = {k: (t[k] is not None and t[k] >= v) for k, v in want.items()}
    t["met"]["max_abs_dp"] = t["max_abs_dp"] is not None and t["max_abs_dp"] <= 0.02  # P(yes), bf16 tolerance
    targets[name.removeprefix("profile_")] = t
doc = {"check": "issue 18 device check", "mode": "cpu dry run (toy shapes; targets not meaningful)" if cpu == "1"
       else "gpu", "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(int(start))),
       "budget_seconds": int(budget), "elapsed_seconds": round(time.time() - int(start), 1),
       "steps_ran": [n for n, s in steps.items() if s["ran"]], "steps_ok": [n for n, s in steps.items() if s.get("ok")],
       "steps": steps, "targets": targets, "log": log}
tmp = out_file + ".tmp"
with open(tmp, "w") as f:
    json.dump(doc, f, indent=1)
os.replace(tmp, out_file)
print(json.dumps({k: doc[k] for k in ("mode", "elapsed_seconds", "steps_ran", "steps_ok")}))
print("targets: " + json.dumps({k: v["met"] for k, v in targets.items()}))
print("wrote " + out_file)
EOF
