"""What several SAM-family methods share, so that no method imports another: the torch-free plan parts (plan: intensity
rules, channel mapping, backbone resolution, the LiteMedSAM margin rule) and the torch parts (slice_input: cached
slice -> SAM input and back; slice_adapter; decoding: batched box and point/box decoding; weights: pretrained SAM
weights; embedding_cache: image embeddings keyed by the weights' identity)."""
