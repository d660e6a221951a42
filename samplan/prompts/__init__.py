"""Prompts for the SAM-family methods: boxes and points from masks (oracle), jitter, 3D propagation, prompts files."""
