"""Stage 6, results: the run record, the result store, tables and the golden regression check."""
