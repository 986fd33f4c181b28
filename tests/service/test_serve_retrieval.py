"""The retrieval contract: anything with the Retriever protocol conditions the pipeline; the registry reloads."""

import numpy as np
import pytest
import torch

from rdm import RDMPipeline, api
from rdm.db.retrieval import DatabaseRegistry, Retrieved, Retriever
from rdm.errors import DatabaseError
from rdm.models.tiny import make_tiny_rdm
from tests.helpers.world import make_folder

pytestmark = pytest.mark.usefixtures("one_thread")


class MemoryRetriever:
    """Vectors and captions in a Python list: no FAISS, no files."""

    def __init__(self, name, identity, vectors, captions):
        self.name, self.identity, self.fingerprint = name, identity, f"mem-{len(vectors)}"
        self.vectors = np.asarray(vectors, np.float32)
        self.captions = list(captions)
        self.count = len(self.vectors)
        self.calls = 0

    def search(self, queries, k, where=None):
        self.calls += 1
        scores = queries @ self.vectors.T  # (Q, N)
        rows = np.argsort(-scores, axis=1)[:, :k]
        top = np.take_along_axis(scores, rows, 1)
        records = [[{"id": f"m{r}", "score": float(s), "row": int(r), "caption": self.captions[r]}
                    for r, s in zip(rq, sq)] for rq, sq in zip(rows, top)]
        return Retrieved(top.astype(np.float32), rows.astype(np.int64), self.vectors[rows], records)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip):
    root = tmp_path_factory.mktemp("retrieval")
    embedder = api.load_embedder(tiny_clip, "cpu", "float32")
    pipe = RDMPipeline.from_pretrained(make_tiny_rdm(root / "model", embedder.identity.to_dict()))
    pipe.set_progress_bar_config(disable=True)
    return root, embedder, pipe


def test_an_in_memory_retriever_conditions_the_pipeline(world):
    _, embedder, pipe = world
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(6, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    memory = MemoryRetriever("memory", embedder.identity, vectors, [f"item {i}" for i in range(6)])
    assert isinstance(memory, Retriever)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
    try:
        out = pipe("a red circle", databases=[(memory, 1.0)], k=3, seed=5, num_inference_steps=2, output_type="np")
    finally:
        hook.remove()
    record = out.provenance[0]
    # one search for the neighbours, one by the copy guard for the output's nearest item (rdm.sampling.copyguard)
    assert memory.calls == 2 and record.databases[0]["name"] == "memory"
    assert record.copy_guard["nearest"]["database"] == "memory"
    assert record.databases[0]["fingerprint"] == "mem-6"
    query = torch.from_numpy(embedder.encode_text(["a red circle"]))[0]
    order = np.argsort(-(vectors @ query.numpy()))[:3]
    context = seen[0][1]  # (1+k, D) of the conditional half
    assert torch.allclose(context[0], query, atol=1e-5)
    assert torch.allclose(context[1:], torch.from_numpy(vectors[order]), atol=1e-6)  # the stored vectors, in order
    assert [h["id"] for h in record.neighbours] == [f"m{r}" for r in order]
    again = pipe("a red circle", databases=[(memory, 1.0)], k=3, seed=5, num_inference_steps=2, output_type="np")
    assert np.array_equal(out.images, again.images)  # deterministic seeds


def test_registry_reopens_after_a_commit_and_serves_names_only(world):
    root, _, pipe = world
    make_folder(root / "pics", 6)
    home = root / "indexes"
    api.build_index(str(root / "pics"), name="P", clip=pipe.rdm_config.embedder["model"], indexes=str(home),
                    workers=0, progress=False)
    registry = DatabaseRegistry(home)
    first = registry.get("P")
    assert registry.get("P") is first and first.count == 6  # opened once
    api.remove("P", ["img000.png"], [], str(home))  # a commit (as another process would make it)
    second = registry.get("P")
    assert second is not first and second.count == 5
    assert second.lookup("img000.png") is None and second.lookup("img001.png")[0]["id"] == "img001.png"
    for hostile in ("../P", "/etc", "P/../P", str(home / "P")):
        with pytest.raises(DatabaseError, match="no database"):
            registry.get(hostile)
    out = pipe("a red circle", databases="P", indexes=registry, k=2, seed=1, num_inference_steps=1, output_type="np")
    assert out.provenance[0].databases[0]["name"] == "P"  # names still work, through the registry handed in
    out = pipe("a red circle", databases="P:1", indexes=home, k=2, seed=1, num_inference_steps=1, output_type="np")
    assert out.provenance[0].databases[0]["count"] == 5  # and through the default registry of a home
