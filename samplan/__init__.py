"""samplan: a self-configuring pipeline for Segment-Anything-family medical image segmentation."""

__version__ = "0.1.0"
