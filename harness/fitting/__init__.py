"""Stage 3, fitting: training replacement networks (streamed MSE) and LM-loss training."""
