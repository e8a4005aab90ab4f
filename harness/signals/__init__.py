"""Stage 2, signals: calibration text and the activations/statistics every method scores layers with."""
