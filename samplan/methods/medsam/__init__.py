"""medsam: box-prompted SAM / MedSAM / LiteMedSAM fine-tuned on 2D slices (plan: .plan; torch parts: .network,
.train, .predict; the registry entry: .method)."""
