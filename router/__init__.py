"""The router: the public InferenceService in front of the GPU workers (see README.md)."""
