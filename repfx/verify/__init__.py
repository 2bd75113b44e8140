"""Verification: the proofs that a rewritten graph computes what the model computes.

``local`` proves each rewrite in float64 on the activations that reach it; ``numeric``
compares whole graphs end to end; ``mismatch`` decides what an end-to-end difference
after proven rewrites means; ``opcount`` counts the ops a module actually executes.
"""
