"""The demo: a tiny LoRA trained on procedural images, on CPU, in minutes."""
