"""Every default the command line, the runner and the library share, defined once (no imports:
the CLI reads these before torch is loaded)."""

RATIO = 0.25  # fraction of dense parameters to remove when neither --ratio nor --layers is given
CALIB_SAMPLES = 128  # calibration blocks
CALIB_SEQ_LEN = 512  # tokens per calibration block (reference models: harness.reference.CALIB_SEQ_LEN)
CALIB_BATCH_SIZE = 8  # blocks per forward pass while scoring
SEED = 0
EVAL_BATCH_SIZE = 8  # lm-eval batch size
EVAL_IMPLS = ("fast", "fast-shared", "stock")
EVAL_IMPL = "fast"  # loglikelihood path: "fast" (harness.evaluation.fastlm) or "stock" (lm-eval's HFLM)
DTYPE = "float32"
DEVICE = "cpu"
OUTPUT_DIR = "results/runs"
TOP_BOUNDARY = "pre-norm"  # X_L for window cosines, BI and angular distance: pre-norm | post-norm (README)
