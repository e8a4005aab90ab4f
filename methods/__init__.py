"""Pruning methods: one plugin file each, registered by name with ``harness.register_method``.

Every module in this package is imported by the registry; a new method is a new file here
(or any file passed with ``--plugins``) and never an edit in ``harness/``.
"""
