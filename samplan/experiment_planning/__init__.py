"""Experiment planning: dataset fingerprint, the planner and the plans file."""
