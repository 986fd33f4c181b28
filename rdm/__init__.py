"""rdm: retrieval-augmented, style-swappable image generation."""

__version__ = "0.1.0"
