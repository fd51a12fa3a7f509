"""Training: what trains, how it is optimised, checkpointed, tracked and looped."""
