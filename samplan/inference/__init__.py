"""Inference: sliding-window / slice-wise dense prediction, fold ensembling, export in the input's geometry."""
