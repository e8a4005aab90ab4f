#!/usr/bin/env python
"""Benchmark layer-pruning methods on a causal LM; see README.md or --help."""
import sys

from harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
