"""The road of the data: storage -> index -> captions -> buckets -> sampler."""
