"""The evaluation numbers in pure torch: metrics.py (context preservation, router shares, AUROC,
PSNR, SSIM), evaluator.py (one picture's scores from embedding functions the caller hands in)
and report.py (the text table, CSV/JSON values and the comparison grid). MoA Evaluate, the
evaluation command line and the trainer compute them here, so every report agrees. Never
imports ComfyUI."""
