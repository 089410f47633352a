"""Hand-off to nnU-Net fine-tuning: plan transfer, pretrained vs. scratch 5-fold runs, comparison report."""
