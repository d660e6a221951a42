"""promise: ProMISe, a frozen SAM prompted by a trained auto-prompting module with incremental pattern shifting (plan:
.plan; torch parts: .network, .decoder, .features, .data, .train, .predict; the registry entry: .method)."""
