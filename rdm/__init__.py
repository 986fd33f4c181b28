"""rdm: retrieval-augmented, style-swappable image generation."""

__version__ = "0.1.0"

__all__ = ["RDMPipeline", "RDMPipelineOutput"]


def __getattr__(name: str):
    """`from rdm import RDMPipeline` without importing torch and diffusers on `import rdm` (PEP 562)."""
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'rdm' has no attribute {name!r}")
