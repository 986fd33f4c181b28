"""Conversion of checkpoints from other code bases into the rdm model folder format."""
