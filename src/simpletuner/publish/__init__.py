"""What leaves a run: the trained weights in the formats users load."""
