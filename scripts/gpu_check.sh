#!/usr/bin/env bash
# One-shot check of a GPU machine (documentation/benchmarks.md, "GPU check"): build a small synthetic dataset,
# plan + preprocess it with the `gpu` profile, run the throughput benchmark of every method (the trainer's AMP:
# bf16 autocast where the GPU supports it, else fp16 + grad scaler; plan key amp_dtype) — step time, the network's own fwd+bwd, data wait with the loader,
# peak memory — then pretrain `mae` for 50 iterations and export the bundle. Writes OUT.md and OUT.json.
# Target: under 8 minutes on one H100/H200-class GPU. The test suite runs the same path with
# `-device cpu` (profile cpu_smoke) and a few iterations.
#
#   scripts/gpu_check.sh [-device cuda|cpu] [-profile gpu|cpu_smoke|cpu_bench] [-iterations 50] [-timed 10]
#                        [-warmup 3] [-o documentation/gpu_check] [-root DIR]
set -euo pipefail
DEVICE=cuda; PROFILE=""; ITER=50; TIMED=10; WARMUP=3; OUT=""; ROOT=""
while [ $# -gt 0 ]; do
    case "$1" in
        -device) DEVICE=$2; shift 2 ;;
        -profile) PROFILE=$2; shift 2 ;;
        -iterations) ITER=$2; shift 2 ;;
        -timed) TIMED=$2; shift 2 ;;
        -warmup) WARMUP=$2; shift 2 ;;
        -o) OUT=$2; shift 2 ;;
        -root) ROOT=$2; shift 2 ;;
        -h|--help) sed -n 2,11p "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see -h)" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python )}
BIN=$(dirname "$PY")
[ -n "$PROFILE" ] || { [ "$DEVICE" = cuda ] && PROFILE=gpu || PROFILE=cpu_smoke; }
[ -n "$OUT" ] || OUT=documentation/gpu_check_$PROFILE
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device visible to $PY; run with -device cpu for the CPU path." >&2; exit 2
fi
# the check's own nnU-Net folders: never the user's data
ROOT=${ROOT:-$(mktemp -d "${TMPDIR:-/tmp}/ssl_nnunet_gpu_check.XXXXXX")}
export nnUNet_raw=$ROOT/nnUNet_raw nnUNet_preprocessed=$ROOT/nnUNet_preprocessed nnUNet_results=$ROOT/nnUNet_results
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results" "$(dirname "$OUT")"
DID=990; NAME=Dataset990_GPUCheck
T0=$(date +%s)

echo "== 1/5 synthetic dataset ($PROFILE) in $ROOT =="
"$PY" - "$nnUNet_raw/$NAME" "$PROFILE" <<'PY'
import json, os, sys
import numpy as np
import SimpleITK as sitk
folder, profile = sys.argv[1], sys.argv[2]
shape, n_cases = ((48, 52, 56), 5) if profile.startswith("cpu") else ((160, 176, 160), 8)
os.makedirs(os.path.join(folder, "imagesTr"), exist_ok=True)
rng = np.random.RandomState(0)
axes = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
for i in range(n_cases):  # noisy ellipsoid "bodies" with an inner structure, 1 mm isotropic
    r = rng.uniform(0.6, 0.85, 3)
    q = sum((a / ri) ** 2 for a, ri in zip(axes, r))
    img = 100.0 * (q < 1) + 80.0 * (q < 0.25) + rng.normal(0, 5, shape).astype(np.float32) * (q < 1)
    itk = sitk.GetImageFromArray(img.astype(np.float32))
    itk.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(itk, os.path.join(folder, "imagesTr", f"GPUCheck_{i:03d}_0000.nii.gz"))
with open(os.path.join(folder, "dataset.json"), "w") as f:
    json.dump({"channel_names": {"0": "MRI"}, "labels": {"background": 0}, "numTraining": n_cases,
               "file_ending": ".nii.gz"}, f)
PY
echo "== 2/5 fingerprint + SSL plan ($PROFILE) + preprocess =="
"$BIN/ssl_nnunet_plan_and_preprocess" -d $DID -profile "$PROFILE" -np 2
echo "== 3/5 throughput benchmark, every method ($DEVICE) =="
"$BIN/ssl_nnunet_benchmark" throughput -d $DID -m all -device "$DEVICE" --warmup "$WARMUP" --timed "$TIMED" \
    -o "$ROOT/throughput"
echo "== 4/5 mae: $ITER pretraining iterations =="
T_PRE=$(date +%s)
"$BIN/ssl_nnunet_pretrain" -d $DID -m mae -device "$DEVICE" --iterations "$ITER"
T_EXP=$(date +%s)
echo "== 5/5 export =="
"$BIN/ssl_nnunet_export" -d $DID -m mae -o "$ROOT/export_mae"
T1=$(date +%s)

"$PY" - "$ROOT" "$OUT" "$DEVICE" "$PROFILE" "$ITER" $((T_EXP - T_PRE)) $((T1 - T0)) "$*" <<'PY'
import json, os, sys, platform
import torch
root, out, device, profile, iters, pretrain_s, total_s, args = sys.argv[1:9]
bench = json.load(open(os.path.join(root, "throughput.json")))
rows = bench["results"] if isinstance(bench, dict) else bench
res = os.path.join(os.environ["nnUNet_results"], "Dataset990_GPUCheck", "SSL_mae__sslPlans__3d_fullres")
ckpt = torch.load(os.path.join(res, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
cuda = device == "cuda"
report = {
    "command": f"scripts/gpu_check.sh {args}".strip(), "device": device, "profile": profile,
    "gpu": torch.cuda.get_device_name(0) if cuda else None,
    "amp": ({"bfloat16": "bf16 autocast", "float16": "fp16 autocast + grad scaler"}.get(rows[0].get("amp"), "off")
            if cuda else "off (CPU)"),
    "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
    "torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
    "throughput": rows,
    "mae_pretraining": {"iterations": int(iters), "iterations_done": ckpt["iterations_done"],
                        "wall_s": int(pretrain_s), "final_train_loss": ckpt["logging"]["train_loss"][-1],
                        "global_batch_size": ckpt["global_batch_size"]},
    "export_ok": os.path.isfile(os.path.join(root, "export_mae", "checkpoint_final.pth")),
    "total_wall_s": int(total_s),
}
with open(out + ".json", "w") as f:
    json.dump(report, f, indent=1)
lines = [f"# GPU check: {report['gpu'] or 'CPU'} ({profile}, AMP {report['amp']})", "",
         f"`{report['command']}` — torch {report['torch']}, {report['total_wall_s']} s in total.", "",
         "| method | SSL step [ms] | network fwd+bwd [ms] | ratio | data wait | peak mem [MB] |",
         "| --- | ---: | ---: | ---: | ---: | ---: |"]
for r in rows:
    lines.append(f"| {r['method']} | {1000 * r['ssl_step_s']:.1f} | {1000 * r['plain_step_s']:.1f} | "
                 f"{r['ratio']:.2f} | {100 * r['data_wait_share']:.1f} % | {r['peak_memory_mb']:.0f} |")
m = report["mae_pretraining"]
lines += ["", f"mae: {m['iterations_done']} pretraining iterations in {m['wall_s']} s (global batch "
              f"{m['global_batch_size']}, final train loss {m['final_train_loss']:.4f}); export "
              f"{'written' if report['export_ok'] else 'MISSING'}."]
with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"\nWrote {out}.md and {out}.json")
sys.exit(0 if report["export_ok"] and m["iterations_done"] == int(iters) else 1)
PY
