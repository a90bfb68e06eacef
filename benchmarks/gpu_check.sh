#!/usr/bin/env bash
# One GPU check, at most about 10 minutes on one modern GPU (each part has a time limit):
#
#   bash benchmarks/gpu_check.sh                          # --device cuda, results in benchmarks/results/gpu/<date>/
#   bash benchmarks/gpu_check.sh --device cpu --quick     # the CI check: tiny sizes, about 1 min on 2 cores
#
# Parts (each one's output in OUT/<part>.log, its time in OUT/parts.tsv and summary.md):
#   tests   tests/test_cuda.py on the device (capture, prune() and a bf16-mixed callback fit) and
#           the NCCL variant of tests/test_ddp.py (skipped, with its reason, on fewer than 2 GPUs)
#   speed   benchmarks/speed.py --device DEVICE (--quick on the device; --smoke with --quick):
#           capture ratio, prune step, memory, latency against Torch-Pruning at ÷2/÷4 FLOPs
#   epoch   one epoch of run.py's paper preset (pretraining, one-pass true-Fisher curvature, prune
#           to ÷2, fine-tuning) on synthetic CIFAR-shaped data per model, timed, and the estimated
#           run time of the README's CIFAR tables (paper_epoch.json)
#   eval    the per-epoch evaluation the paper preset adds to each fine-tuning epoch, timed
# then summary.md (command, date, device, every figure). Every part runs even if one fails; the
# exit status is non-zero if any failed or ran past its limit.
#
# Options: --device cuda|cuda:N|cpu (default cuda), --quick (tiny sizes: checks that everything
# runs; its numbers are not measurements), --out DIR. Without --out, a cuda run without --quick
# writes to benchmarks/results/gpu/<date>/; quick or CPU runs write to a fresh temporary folder
# (and any quick/CPU output folder gets a .gitignore of "*", so it is never committed as GPU results).
# Time limits per part (seconds; on the device 110, 250, 90 per model and 60, so 600 s in all) can be
# changed with GPU_CHECK_LIMIT_TESTS, _SPEED, _EPOCH (per model) and _EVAL.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
QUICK=0
OUT=""
usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    --quick) QUICK=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
CMD="bash benchmarks/gpu_check.sh --device $DEVICE"
if [[ $QUICK == 1 ]]; then CMD+=" --quick"; fi
CMD+="${OUT:+ --out $OUT}"
STAMP=$(date +%Y-%m-%d)
MEASURED=1
if [[ $QUICK == 1 || $DEVICE == cpu ]]; then MEASURED=0; fi
if [[ -z "$OUT" ]]; then
  if [[ $MEASURED == 1 ]]; then
    OUT="benchmarks/results/gpu/$STAMP"
  else
    OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
  fi
fi

if [[ $QUICK == 1 ]]; then
  LIMIT_TESTS=${GPU_CHECK_LIMIT_TESTS:-300}; LIMIT_SPEED=${GPU_CHECK_LIMIT_SPEED:-300}
  LIMIT_EPOCH=${GPU_CHECK_LIMIT_EPOCH:-300}; LIMIT_EVAL=${GPU_CHECK_LIMIT_EVAL:-120}
  MODELS=(vgg19-narrow)
elif [[ $DEVICE == cpu ]]; then  # the full protocol on a CPU: hours, no 10-minute budget
  LIMIT_TESTS=${GPU_CHECK_LIMIT_TESTS:-1800}; LIMIT_SPEED=${GPU_CHECK_LIMIT_SPEED:-3600}
  LIMIT_EPOCH=${GPU_CHECK_LIMIT_EPOCH:-86400}; LIMIT_EVAL=${GPU_CHECK_LIMIT_EVAL:-3600}
  MODELS=(vgg19 resnet32-wide)
else
  LIMIT_TESTS=${GPU_CHECK_LIMIT_TESTS:-110}; LIMIT_SPEED=${GPU_CHECK_LIMIT_SPEED:-250}
  LIMIT_EPOCH=${GPU_CHECK_LIMIT_EPOCH:-90}; LIMIT_EVAL=${GPU_CHECK_LIMIT_EVAL:-60}
  MODELS=(vgg19 resnet32-wide)
fi

# A quick CPU run uses one thread per process (unless OMP_NUM_THREADS says otherwise): on a shared
# machine with 2 cores, two threads per process were 10–100× slower than one (threads spin-waiting).
if [[ $QUICK == 1 && $DEVICE == cpu ]]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-${OMP_NUM_THREADS:-1}}
fi

echo "gpu_check: $CMD"
echo "gpu_check: python $PY, results in $OUT"
if [[ $MEASURED == 0 ]]; then
  echo "gpu_check: quick / CPU run: its numbers are NOT GPU measurements, do not commit or quote them"
fi

# Preflight: the device must exist (the tests would only be skipped otherwise).
PRE=$(mktemp)
if ! "$PY" - "$DEVICE" >"$PRE" <<'EOF'
import json, platform, sys
import torch
name = sys.argv[1]
dev = torch.device(name)
if dev.type == "cuda":
    if not torch.cuda.is_available():
        sys.exit(f"gpu_check: --device {name}, but torch.cuda.is_available() is False (torch {torch.__version__})")
    label = torch.cuda.get_device_name(dev)
    extra = {"cuda": torch.version.cuda, "gpus": torch.cuda.device_count()}
elif dev.type == "cpu":
    label = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            label = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    extra = {"gpus": torch.cuda.device_count()}
else:
    sys.exit(f"gpu_check: --device must be cuda, cuda:N or cpu, got {name}")
info = {"device": name, "name": label, "torch": torch.__version__, "host": platform.node(),
        "threads": torch.get_num_threads(), **extra}
print(json.dumps(info))
EOF
then
  echo "gpu_check: the device is not usable; nothing was run" >&2
  rm -f "$PRE"
  exit 2
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [[ $MEASURED == 0 ]]; then printf '*\n' >"$OUT/.gitignore"; fi
: >"$OUT/parts.tsv"
mv "$PRE" "$OUT/device.json"
echo "gpu_check: device $(cat "$OUT/device.json")"

FAILED=0
# run_part NAME LIMIT_S CMD...: runs CMD with a time limit, output to OUT/NAME.log (and the screen).
run_part() {
  local name=$1 limit=$2; shift 2
  local t0 t1 rc
  echo
  echo "=== $name (limit ${limit} s): $*"
  t0=$(date +%s.%N)
  set +e
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  t1=$(date +%s.%N)
  local secs
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  local status=ok
  if [[ $rc == 124 || $rc == 137 ]]; then status="timeout after ${limit} s"; elif [[ $rc != 0 ]]; then status="failed (exit $rc)"; fi
  if [[ $status != ok ]]; then FAILED=1; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$secs" "$rc" "$status" >>"$OUT/parts.tsv"
  echo "=== $name: $status in ${secs} s"
}

# (a) the device tests and the NCCL DDP variant (-rs prints every skip reason)
run_part tests "$LIMIT_TESTS" env LED_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -rs -p no:cacheprovider \
  --junitxml="$OUT/tests.xml" tests/test_cuda.py \
  "tests/test_ddp.py::test_ddp_spawn_two_rounds_decide_once_for_all_ranks[gpu-rounds]" \
  "tests/test_ddp.py::test_ddp_spawn_two_rounds_decide_once_for_all_ranks[gpu-channels]" \
  "tests/test_ddp.py::test_ddp_script_in_a_subprocess_gives_the_same_result[gpu-rounds]" \
  "tests/test_ddp.py::test_ddp_script_in_a_subprocess_gives_the_same_result[gpu-channels]"

# (b) speed.py on the device
if [[ $QUICK == 1 ]]; then SPEED_MODE=--smoke; else SPEED_MODE=--quick; fi
run_part speed "$LIMIT_SPEED" "$PY" benchmarks/speed.py --device "$DEVICE" $SPEED_MODE --json "$OUT/speed.json"

# (c) one epoch of the paper preset on synthetic CIFAR-shaped data, per model. What is timed: the
# pretraining epoch (Lightning fit), the prune with its one-pass true-Fisher curvature, and the
# fine-tuning epoch (fit). Untimed work is cut short: run.py re-estimates BatchNorm and tests after
# each fit on the CPU (Lightning returns the model there), so the BN refresh gets 4 batches and the
# test 500 images here; part (d) times the full evaluation on the device and extrapolates the CPU tail.
EPOCH_ARGS=(--dataset synthetic-cifar10 --preset paper --method eigendamage --flops-x 2 --seed 0
  --pretrain-epochs 1 --finetune-epochs 1 --force)
if [[ $QUICK == 1 ]]; then
  EPOCH_ARGS+=(--train-subset 64 --batch-size 32 --test-subset 64 --fisher-batches 2 --bn-batches 2
    --latency-repeats 2)
else
  EPOCH_ARGS+=(--test-subset 500 --bn-batches 4 --latency-repeats 3)
fi
# On --device cpu the runner must not pick up a GPU (it uses one whenever there is one).
case "$DEVICE" in
  cpu) VISIBLE=(env CUDA_VISIBLE_DEVICES=); RUN_DEVICE=cpu ;;
  cuda:*) VISIBLE=(env CUDA_VISIBLE_DEVICES="${DEVICE#cuda:}"); RUN_DEVICE=cuda ;;
  *) VISIBLE=(env); RUN_DEVICE=cuda ;;
esac
rm -rf "$OUT/paper-epoch"
for model in "${MODELS[@]}"; do
  run_part "epoch-$model" "$LIMIT_EPOCH" "${VISIBLE[@]}" "$PY" benchmarks/run.py --model "$model" "${EPOCH_ARGS[@]}" \
    --out "$OUT/paper-epoch" --cache "$OUT/paper-epoch/cache"
done

# (d) the evaluation the paper preset adds to every fine-tuning epoch but the last (run.py's
# EvalEachEpoch: BatchNorm re-estimated over the whole training set on a copy, then the whole test
# set), timed on the device with the dense network (an upper bound for the pruned ones), and the
# CPU tail of every run (BN refresh and test after the fit, on the CPU), extrapolated from one batch.
cat >"$OUT/eval_timing.py" <<'EOF_EVAL'
"""Time run.py's per-epoch evaluation and CPU tail on each cached dense network (OUT DEVICE QUICK MODEL...)."""
import copy, json, sys, time
from pathlib import Path

import torch

sys.path.insert(0, ".")
from benchmarks import run  # noqa: E402
from benchmarks.data import load_data  # noqa: E402

out, device, quick, models = Path(sys.argv[1]), torch.device(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


res = {}
for model in models:
    recs = list((out / "paper-epoch" / "records").glob(f"*_{model}_eigendamage_x2_s0.json"))
    caches = list((out / "paper-epoch" / "cache").glob(f"*-{model}-dense-*.pt"))
    if not recs or not caches:
        print(f"{model}: no record or cache (its epoch run failed)")
        continue
    rec = json.loads(recs[0].read_text())
    proto = rec["protocol"]
    n = proto["train_images"]
    data = load_data("synthetic-cifar10", train_subset=None if n >= 50_000 else n)
    bn_batches = run.PRESETS["paper"]["bn_batches"]  # the preset's: the whole training set
    if quick:  # the quick run's own tiny sizes
        bn_batches, k = proto["bn_batches"], int(rec["command"].split("--test-subset ")[1].split()[0])
        data.x_test, data.y_test = data.x_test[:k], data.y_test[:k]
    net = run.build_model(model, data.n_classes, data.in_channels)
    net.load_state_dict(torch.load(caches[0], weights_only=True)["state_dict"])
    net.to(device)
    bn = run._batches(data, bn_batches, proto["batch_size"], 1000)
    times = []
    for _ in range(1 if len(bn) > 100 else 2):  # a long pass needs no separate warm-up
        sync()
        t = time.perf_counter()
        probe = copy.deepcopy(net)
        run.refresh_bn(probe, bn)
        run.accuracy(probe, data)
        sync()
        times.append(time.perf_counter() - t)
    # run.py's tail after each fit runs on the CPU: BN over the training set, then the test set.
    cpu = copy.deepcopy(net).cpu().eval()
    x = data.x_train[: proto["batch_size"]]
    per = []
    with torch.no_grad():
        for _ in range(2):
            t = time.perf_counter()
            cpu(x)
            per.append((time.perf_counter() - t) / len(x))
    images = 50_000 + 10_000 if not quick else len(data.y_train) + len(data.y_test)
    res[model] = {
        "eval_epoch_s": times[-1],
        "bn_batches": len(bn),
        "test_images": len(data.y_test),
        "cpu_tail_s": per[-1] * images,
        "cpu_s_per_image": per[-1],
    }
    print(
        f"{model}: per-epoch evaluation {times[-1]:.2f} s on {device} ({len(bn)} BN batches, "
        f"{len(data.y_test)} test images); CPU tail ~{per[-1] * images:.1f} s ({images} images)"
    )
(out / "paper_eval.json").write_text(json.dumps(res, indent=1))
sys.exit(0 if len(res) == len(models) else 1)
EOF_EVAL
run_part eval "$LIMIT_EVAL" "${VISIBLE[@]}" "$PY" "$OUT/eval_timing.py" "$OUT" "$RUN_DEVICE" "$QUICK" "${MODELS[@]}"

# The paper-preset estimate and summary.md, from what the parts wrote.
echo
echo "=== summary"
if ! "$PY" - "$OUT" "$CMD" "$QUICK" "${MODELS[@]}" <<'EOF'
import json, math, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

sys.path.insert(0, ".")
from benchmarks.run import METHODS, PRESETS  # noqa: E402

out, cmd, quick, models = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4:]
device = json.loads((out / "device.json").read_text())
parts = [line.split("\t") for line in (out / "parts.tsv").read_text().splitlines() if line]

# --- paper preset: one epoch per model -> estimate of the README's CIFAR tables -------------
paper = PRESETS["paper"]
targets, seeds = 3, 2  # --flops-x 2 4 8, --seed 0 1 (the README's commands)
rows = len(METHODS) * targets * seeds
est = {"dataset": "synthetic-cifar10", "quick": quick, "device": device, "models": {},
       "paper_preset": {"pretrain_epochs": paper["pretrain_epochs"], "finetune_epochs": paper["finetune_epochs"]},
       "table": {"methods": len(METHODS), "flops_targets": targets, "seeds": seeds, "rows": rows,
                 "epochs": 2 * paper["pretrain_epochs"] + rows * paper["finetune_epochs"]}}
evals = json.loads((out / "paper_eval.json").read_text()) if (out / "paper_eval.json").exists() else {}
for model in models:
    recs = list((out / "paper-epoch" / "records").glob(f"*_{model}_eigendamage_x2_s0.json"))
    caches = list((out / "paper-epoch" / "cache").glob(f"*-{model}-dense-*.pt"))
    if not recs or not caches:
        est["models"][model] = {"error": "no record (the epoch run failed or timed out)"}
        continue
    rec = json.loads(recs[0].read_text())
    info = torch.load(caches[0], weights_only=True)["info"]
    n = rec["protocol"]["train_images"]
    scale = 50_000 / n  # to CIFAR's training set size (1 unless --quick)
    pre, ft, pr = info["train_s"], rec["time_s"]["finetune"], rec["time_s"]["prune"]
    # The pretraining time includes run.py's test of the dense network on the CPU (the run's test
    # subset): taken out with the CPU time per image measured in part (d).
    test_n = int(rec["command"].split("--test-subset ")[1].split()[0]) if "--test-subset " in rec["command"] else 10_000
    pre_cpu_test = (evals.get(model, {}).get("cpu_s_per_image") or 0.0) * test_n
    pre_raw, pre = pre, max(pre - pre_cpu_test, 0.5 * pre)
    ev = evals.get(model, {}).get("eval_epoch_s")
    # Dense and Slimming pretraining (200 epochs each), then per row 150 fine-tuning epochs (each
    # with its evaluation) and a prune with one-pass curvature; the ÷2 EigenDamage epoch stands in
    # for every row's epoch, the dense network's evaluation for every evaluation.
    tail = evals.get(model, {}).get("cpu_tail_s") or 0.0  # run.py's BN refresh + test on the CPU
    per_row = paper["finetune_epochs"] * (ft + (ev or 0.0)) + pr + tail
    hours = (2 * paper["pretrain_epochs"] * pre + rows * per_row) * scale / 3600
    est["models"][model] = {
        "train_images": n, "batch_size": rec["protocol"]["batch_size"],
        "pretrain_epoch_s": pre, "pretrain_s_with_cpu_test": pre_raw, "finetune_epoch_s": ft, "prune_s": pr, "eval_epoch_s": ev,
        "cpu_tail_s": tail,
        "estimate_includes_eval": ev is not None,
        "pretrain_epoch_s_50k": pre * scale, "finetune_epoch_s_50k": ft * scale,
        "flops_reduction": rec["flops_reduction"], "estimate_h_per_dataset": hours,
        "record": str(recs[0].relative_to(out)),
    }
done = [m for m in est["models"].values() if "estimate_h_per_dataset" in m]
if done:
    est["estimate_h_all"] = 2 * sum(m["estimate_h_per_dataset"] for m in done)  # cifar10 + cifar100
    est["estimate_covers"] = [k for k, m in est["models"].items() if "estimate_h_per_dataset" in m]
if quick:
    est["note"] = "--quick: a tiny subset and a narrow model; these figures are NOT measurements"
(out / "paper_epoch.json").write_text(json.dumps(est, indent=1))

# --- tests --------------------------------------------------------------------------------
tests = {"passed": [], "skipped": [], "failed": []}
if (out / "tests.xml").exists():
    for case in ET.parse(out / "tests.xml").getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        skip = case.find("skipped")
        if skip is not None:
            tests["skipped"].append((name, skip.get("message", "")))
        elif case.find("failure") is not None or case.find("error") is not None:
            tests["failed"].append((name, ""))
        else:
            tests["passed"].append((name, ""))

# --- summary.md ---------------------------------------------------------------------------
L = ["# GPU check (`benchmarks/gpu_check.sh`)", ""]
if quick or device["device"] == "cpu":
    L += ["**Quick or CPU run: these numbers are NOT GPU measurements; do not quote or commit them.**", ""]
L += [f"Command: `{cmd}`", f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
      f"Device: {device['device']}, {device['name']} (torch {device['torch']}, host {device['host']}, "
      f"{device['threads']} CPU threads, {device.get('gpus', 0)} CUDA device(s))", "",
      "| part | seconds | status |", "| --- | --- | --- |"]
L += [f"| {p[0]} | {p[1]} | {p[3]} |" for p in parts]
L += [f"| total | {sum(float(p[1]) for p in parts):.1f} | |", "", "## Tests", "",
      f"{len(tests['passed'])} passed, {len(tests['skipped'])} skipped, {len(tests['failed'])} failed "
      f"(`LED_TEST_DEVICE={device['device']}`)."]
L += [f"- skipped `{n}`: {why}" for n, why in tests["skipped"]]
L += [f"- FAILED `{n}`" for n, _ in tests["failed"]]
if (out / "speed.json").exists():
    sp = json.loads((out / "speed.json").read_text())
    L += ["", "## speed.py", "", f"`{sp['command']}`; {sp['machine']}; {sp['repeats']} repeats, "
          f"timings of at least {sp['min_ms']:g} ms.", "",
          "| model | plain step ms | empirical capture | true-Fisher step | epoch |", "| --- | --- | --- | --- | --- |"]
    for name, r in sp["capture"].items():
        L.append(f"| {name} | {1e3 * r['plain_s']:.2f} | {r['empirical_ratio']:.3f}× | "
                 f"{r['true_step_ratio']:.3f}× | {r['epoch_ratio']:.3f}× |")
    L += [""] + [f"- prune step {name}: {r['prune_s']:.2f} s (FLOPs ÷{r['flops_x']:.2f})"
                 for name, r in sp["prune"].items()]
    L += [f"- memory {name}: train step {r['train_peak_mb']:.1f} MB, prune step {r['prune_peak_mb']:.1f} MB "
          f"(ratio {r['ratio']:.2f})" for name, r in sp["memory"].items()]
    L += ["", "Eval latency, speed-up over dense, against Torch-Pruning (L1 channels) at the same FLOPs:", "",
          "| model | format | batch | variant | FLOPs ÷ | ours | Torch-Pruning | ours / TP |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sp["vs_torch_pruning"]:
        tp = "-" if r["tp_speedup"] is None else f"{r['tp_speedup']:.2f}×"
        rel = "-" if r["vs_tp"] is None else f"{r['vs_tp']:.2f}"
        L.append(f"| {r['model']} | {r['format']} | {r['batch']} | {r['variant']} | {r['flops_x']:.2f} | "
                 f"{r['speedup']:.2f}× | {tp} | {rel} |")
L += ["", "## One epoch of the paper preset (synthetic CIFAR-10-shaped data)", ""]
for model, m in est["models"].items():
    if "error" in m:
        L.append(f"- {model}: {m['error']}")
        continue
    L.append(f"- {model} ({m['train_images']} images, batch {m['batch_size']}): pretraining epoch "
             f"{m['pretrain_epoch_s']:.1f} s, curvature pass + prune {m['prune_s']:.1f} s, fine-tuning epoch "
             f"(÷{m['flops_reduction']:.2f}) {m['finetune_epoch_s']:.1f} s, per-epoch evaluation "
             f"{'not measured' if m['eval_epoch_s'] is None else format(m['eval_epoch_s'], '.1f') + ' s'}, "
             f"CPU tail per run ~{m['cpu_tail_s']:.0f} s → a CIFAR table "
             f"({est['table']['rows']} rows, {est['table']['epochs']:,} epochs): **{m['estimate_h_per_dataset']:.1f} h** "
             f"per dataset")
if "estimate_h_all" in est:
    L.append(f"- both datasets × {', '.join(est['estimate_covers'])}: **{est['estimate_h_all']:.1f} h** on this device")
L += ["", f"Estimate: 2 × {paper['pretrain_epochs']} pretraining epochs (dense and NN Slimming) + {rows} rows "
      f"({len(METHODS)} methods × {targets} FLOPs targets × {seeds} seeds) × ({paper['finetune_epochs']} "
      "fine-tuning epochs with their evaluation + one prune with its one-pass curvature); the ÷2 "
      "EigenDamage fine-tuning epoch stands in for every row's epoch (÷4/÷8 and channel-pruned "
      "networks are cheaper), the dense network's evaluation for every evaluation; the CPU tail (run.py "
      "re-estimates BatchNorm and tests after each fit on the CPU) is extrapolated from one batch, and "
      "so is the CPU test inside the pretraining time, which is taken out of it.", ""]
(out / "summary.md").write_text("\n".join(L) + "\n")
print("\n".join(L))
bad = [k for k, m in est["models"].items() if "error" in m]
# The device was checked before the tests: a skipped device test means something is wrong.
bad += [n for n, _ in tests["skipped"] if "test_cuda" in n]
if not tests["passed"]:
    bad.append("no device test passed")
if bad:
    print(f"gpu_check: summary problems: {bad}", file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
then
  FAILED=1
fi

echo
echo "gpu_check: time per part (s):"
awk -F'\t' '{ printf "  %-24s %8s  %s\n", $1, $2, $4 }' "$OUT/parts.tsv"
echo "gpu_check: results in $OUT"
if [[ $FAILED != 0 ]]; then
  echo "gpu_check: FAILED (see the logs in $OUT)" >&2
  exit 1
fi
echo "gpu_check: all parts passed"
