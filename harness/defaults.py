"""Every default the command line, the runner and the library share, defined once (no imports:
the CLI reads these before torch is loaded)."""

RATIO = 0.25  # fraction of dense parameters to remove when neither --ratio nor --layers is given
CALIB_SAMPLES = 128  # calibration blocks
CALIB_SEQ_LEN = 512  # tokens per calibration block (reference models: harness.reference.CALIB_SEQ_LEN)
CALIB_BATCH_SIZE = 8  # blocks per forward pass while scoring
SEED = 0
EVAL_BATCH_SIZE = 8  # lm-eval batch size
# --eval-batch-size auto on CPU: lm-eval's detection looks for the largest batch that does not raise an
# out-of-memory error, but a CPU raises none (the kernel kills the process instead), so there auto may
# pick at most the batch whose full logits (sequence of AUTO_CPU_SEQ_LEN tokens x vocabulary, float32)
# fit in AUTO_CPU_MEMORY_SHARE of the machine's memory, and never more than AUTO_CPU_MAX_BATCH
AUTO_CPU_MAX_BATCH = 16
AUTO_CPU_SEQ_LEN = 2048
AUTO_CPU_MEMORY_SHARE = 0.25
EVAL_IMPLS = ("fast", "fast-shared", "stock")
EVAL_IMPL = "fast-shared"  # loglikelihood path: "fast-shared", "fast" (harness.evaluation.fastlm, shared_context) or "stock" (lm-eval's HFLM)
DTYPE = "float32"
DEVICE = "cpu"
OUTPUT_DIR = "results/runs"
TOP_BOUNDARY = "pre-norm"  # X_L for window cosines, BI and angular distance: pre-norm | post-norm (README)
