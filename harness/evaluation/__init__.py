"""Stage 5, evaluation: lm-eval tasks on the in-memory model, perplexity, stability."""
