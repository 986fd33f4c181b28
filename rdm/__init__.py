"""rdm: retrieval-augmented, style-swappable image generation.

The package follows its data (docs/layout.md): util, images, models, sources -> embed -> db -> build, curate ->
sampling -> train, demo -> service -> api, cli. Each layer imports only from the layers below it (the import-linter
contracts in pyproject.toml, checked by CI).
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

__all__ = ["RDMPipeline", "RDMPipelineOutput"]

# Modules that moved into subpackages; the old import paths keep working for one release (with a warning).
MOVED = {
    "rdm.adapters": "rdm.models.adapters", "rdm.attention": "rdm.sampling.attention",
    "rdm.build_ray": "rdm.build.ray_data",
    "rdm.compaction": "rdm.db.compaction", "rdm.conditioning": "rdm.sampling.conditioning",
    "rdm.convert": "rdm.models.convert", "rdm.convert.compvis": "rdm.models.convert.compvis",
    "rdm.convert.safe_load": "rdm.models.convert.safe_load", "rdm.copyguard": "rdm.sampling.copyguard",
    "rdm.credentials": "rdm.sampling.credentials", "rdm.curate_report": "rdm.curate.report",
    "rdm.database": "rdm.db.database", "rdm.decode": "rdm.images.decode", "rdm.download": "rdm.models.download",
    "rdm.editing": "rdm.sampling.editing", "rdm.embedder": "rdm.embed.embedder",
    "rdm.generate": "rdm.sampling.generate",
    "rdm.identity": "rdm.embed.identity", "rdm.index": "rdm.db.faiss_index", "rdm.licence": "rdm.db.licence",
    "rdm.modelformat": "rdm.models.format", "rdm.pipeline": "rdm.sampling.pipeline", "rdm.pixels": "rdm.images.pixels",
    "rdm.provenance": "rdm.sampling.provenance", "rdm.registry": "rdm.models.assets",
    "rdm.retrieval": "rdm.db.retrieval",
    "rdm.score": "rdm.sampling.score", "rdm.segment": "rdm.db.segment", "rdm.selection": "rdm.sampling.selection",
    "rdm.sheets": "rdm.images.sheets", "rdm.sources_webdataset": "rdm.sources.webdataset",
    "rdm.spawn": "rdm.util.spawn",
    "rdm.store": "rdm.db.store", "rdm.tiny": "rdm.models.tiny", "rdm.warm": "rdm.db.warm",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import rdm.database` gives the module now at rdm.db.database (the same module object)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=3)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        sys.modules[module.__spec__.name] = module  # the alias and the real module are one object


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())  # before the path finder: rdm.convert.compvis is not a file any more


def __getattr__(name: str):
    """`from rdm import RDMPipeline` without importing torch and diffusers on `import rdm` (PEP 562)."""
    if name in __all__:
        from .sampling import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'rdm' has no attribute {name!r}")
