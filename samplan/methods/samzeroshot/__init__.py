"""samzeroshot: prompted SAM-family segmentation without training (plan: .plan; torch parts: .network, .predict;
the registry entry: .method)."""
