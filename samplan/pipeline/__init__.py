"""The jobs that span stages, above training, inference and evaluation: plan-and-preprocess with the methods'
sections (planning), training followed by the final validation (train)."""
