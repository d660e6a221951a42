"""Prompts for the SAM-family methods: boxes (and later points) from masks, jitter and 3D propagation."""
