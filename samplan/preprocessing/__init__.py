"""Preprocessing: crop to the nonzero region, normalise, resample, and cache cases for training."""
