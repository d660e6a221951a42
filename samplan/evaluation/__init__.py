"""Evaluation: per-case metrics and folder evaluation into summary.json."""
