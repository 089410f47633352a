#!/usr/bin/env bash
# `make demo`: build the demo datasets, plan + preprocess them, pretrain MAE briefly and export the bundle.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
root=$(pwd)/ssl_nnunet_data
export nnUNet_raw=${nnUNet_raw:-$root/nnUNet_raw}
export nnUNet_preprocessed=${nnUNet_preprocessed:-$root/nnUNet_preprocessed}
export nnUNet_results=${nnUNet_results:-$root/nnUNet_results}
BIN=.venv/bin
ITER=${DEMO_ITERATIONS:-200}
PROFILE=${DEMO_PROFILE:-cpu_smoke}   # cpu_bench: 64^3 patches, ~30 min more on 2 cores

echo "== 1/5 demo datasets (nilearn MNI152) =="
$BIN/ssl_nnunet_make_demo_dataset
echo "== 2/5 fingerprint + SSL plan + preprocess (profile $PROFILE) =="
$BIN/ssl_nnunet_plan_and_preprocess -d 900 901 -np 2 -profile "$PROFILE"
echo "== 3/5 MAE pretraining on Dataset900 ($ITER iterations, CPU) =="
$BIN/ssl_nnunet_pretrain -d 900 -m mae -device cpu --iterations "$ITER"
echo "== 4/5 export the weights bundle =="
$BIN/ssl_nnunet_export -d 900 -m mae -o "$nnUNet_results/Dataset900_DemoBrainSSL/export_mae"
echo "== 5/5 fine-tune on Dataset901 with nnU-Net (fold 0, pretrained vs scratch, 300 iterations each) =="
$BIN/ssl_nnunet_finetune -d 901 -w "$nnUNet_results/Dataset900_DemoBrainSSL/export_mae" -f 0 --scratch \
    -tr "${DEMO_FINETUNE_TRAINER:-nnUNetTrainer_SSLFinetune_CPU300}" -device cpu -np 2
echo
echo "Demo finished. Outputs:"
echo "  raw datasets:      $nnUNet_raw/Dataset900_DemoBrainSSL, Dataset901_DemoBrainSeg"
echo "  plans + data:      $nnUNet_preprocessed/Dataset900_DemoBrainSSL/sslPlans.json (and sslPlans_3d_fullres/)"
echo "  pretraining run:   $nnUNet_results/Dataset900_DemoBrainSSL/SSL_mae__sslPlans__3d_fullres/ (progress.png, log)"
echo "  weights bundle:    $nnUNet_results/Dataset900_DemoBrainSSL/export_mae/ (checkpoint_final.pth + model card)"
echo "  fine-tuning:       $nnUNet_results/Dataset901_DemoBrainSeg/ssl_nnunet_finetune/ (report_*/finetune_report.md)"
