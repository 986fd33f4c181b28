"""Control over the neighbours: weights (a log(w) cross-attention bias), diversity (MMR, duplicates, max-per),
negatives, content subtraction and the window of steps in which the neighbours act."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rdm import api
from rdm.cli import main as cli
from rdm.db.retrieval import Retrieved
from rdm.errors import RDMError
from rdm.models.tiny import make_tiny_rdm
from rdm.sampling.conditioning import NeighbourControl, Neighbours, retrieve, subtract_content
from rdm.sampling.pipeline import RDMPipeline
from rdm.sampling.selection import Selection, mean_pairwise_cosine, parse_max_per, select
from tests.helpers.world import make_folder

pytestmark = pytest.mark.usefixtures("one_thread")


class Memory:
    """An in-memory Retriever (exact inner-product search) over unit vectors with records."""

    def __init__(self, vectors: np.ndarray, records: list[dict], name: str = "mem"):
        self.vectors, self.records, self.name = vectors.astype(np.float32), records, name
        self.count, self.fingerprint = len(vectors), "f" * 16

    def search(self, queries, k, where=None):
        scores = queries @ self.vectors.T  # (Q, N)
        order = np.argsort(-scores, 1, kind="stable")[:, :k]
        rows = order.astype(np.int64)
        return Retrieved(np.take_along_axis(scores, order, 1).astype(np.float32), rows, self.vectors[order],
                         [[{"id": self.records[r]["id"], "score": float(scores[q, r]), "row": int(r),
                            **{c: v for c, v in self.records[r].items() if c != "id"}} for r in rq]
                          for q, rq in enumerate(rows)])


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def planted():
    """40 items: 8 'originals', each with 4 near-copies (cosine > 0.99), each item with an artist."""
    rng = np.random.default_rng(0)
    originals = unit(rng.normal(size=(8, 32)))
    vectors, records = [], []
    for i, o in enumerate(originals):
        for c in range(5):
            vectors.append(unit(o + 0.01 * rng.normal(size=32)))
            records.append({"id": f"o{i}-c{c}", "artist": f"a{i % 3}"})
    return Memory(np.stack(vectors), records), originals


# --- diversity -------------------------------------------------------------------------------------

def test_diversity_zero_selection_is_todays_nearest_k(planted):
    db, originals = planted
    q = unit(originals[:3] + 0.3 * originals[3:6])
    plain = retrieve(q, [(db, 1.0)], 6)
    # a selection that over-fetches and runs the greedy pick, at diversity 0 with a limit that never binds
    picked = retrieve(q, [(db, 1.0)], 6, selection=Selection(diversity=0.0, max_per={"artist": 100}))
    assert [[h["id"] for h in hq] for hq in plain.hits] == [[h["id"] for h in hq] for hq in picked.hits]
    assert np.array_equal(plain.embeddings, picked.embeddings)
    assert Selection().nearest and Selection().candidates(6) == 6


def test_mmr_never_returns_two_duplicates_while_others_exist(planted):
    db, originals = planted
    q = unit(originals[:4] + 0.2 * originals[4:8])
    plain = retrieve(q, [(db, 1.0)], 5)
    assert all(len({h["id"].split("-")[0] for h in hq}) == 1 for hq in plain.hits)  # nearest-5: one item 5 times
    for diversity in (0.2, 0.5, 1.0):
        found = retrieve(q, [(db, 1.0)], 5, selection=Selection(diversity=diversity))
        assert found.k == 5  # exact k
        for e, hq in zip(found.embeddings, found.hits):
            sims = e @ e.T
            assert (sims[~np.eye(5, dtype=bool)] <= 0.95).all(), [h["id"] for h in hq]
            assert len({h["id"].split("-")[0] for h in hq}) == 5
        assert mean_pairwise_cosine(found.embeddings) < mean_pairwise_cosine(plain.embeddings) - 0.5
    # only duplicates left (k > distinct items): still exactly k, the duplicates last
    many = retrieve(q[:1], [(db, 1.0)], 12, selection=Selection(diversity=0.5))
    assert many.k == 12 and len({h["id"].split("-")[0] for h in many.hits[0]}) == 8


def test_max_per_holds(planted):
    db, originals = planted
    q = unit(originals[:2])
    found = retrieve(q, [(db, 1.0)], 6, selection=Selection(max_per={"artist": 2}))
    for hq in found.hits:
        artists = [h["artist"] for h in hq]
        assert len(artists) == 6 and max(artists.count(a) for a in set(artists)) == 2
    with pytest.warns(UserWarning, match="only"):  # 3 artists x 1 each: fewer than asked, said
        few = retrieve(q, [(db, 1.0)], 6, selection=Selection(max_per={"artist": 1}))
    assert few.k == 3
    assert parse_max_per(["artist=2", "source=1"]) == {"artist": 2, "source": 1}
    for bad in (["artist"], ["artist=x"], ["=2"]):
        with pytest.raises(RDMError, match="COLUMN=N"):
            parse_max_per(bad)
    with pytest.raises(RDMError, match="diversity"):
        Selection(diversity=1.5)


def test_select_prefers_the_nearer_among_equals():
    v = unit(np.eye(4, dtype=np.float32))
    assert select(np.array([0.9, 0.8, 0.7, 0.6]), v, [{}] * 4, 2, Selection(diversity=0.3)) == [0, 1]


def test_content_subtraction_moves_neighbours_away_from_the_query():
    rng = np.random.default_rng(1)
    q = unit(rng.normal(size=(2, 16))).astype(np.float32)
    e = unit(q[:, None] + 0.5 * rng.normal(size=(2, 3, 16))).astype(np.float32)
    n = Neighbours(e, np.ones((2, 3), np.float32), [[{}] * 3] * 2)
    out = subtract_content(n, q, 1.0)
    assert np.allclose(np.linalg.norm(out.embeddings, axis=-1), 1, atol=1e-5)
    before, after = np.einsum("qkd,qd->qk", e, q), np.einsum("qkd,qd->qk", out.embeddings, q)
    assert (after < before - 0.2).all()
    assert subtract_content(n, q, 0.0) is n


# --- the pipeline ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tmp_path_factory, tiny_clip):
    root = tmp_path_factory.mktemp("control")
    identity = api.load_embedder(tiny_clip).identity.to_dict()
    p = RDMPipeline.from_pretrained(make_tiny_rdm(root / "model", identity, k=3))
    p.set_progress_bar_config(disable=True)
    make_folder(root / "refs", 4, seed=7)
    return p, sorted((root / "refs").glob("*.png"))


def run(p, refs, **kw):
    kw = {"num_inference_steps": 3, "guidance_scale": 3.0, "seed": 2, "output_type": "np", **kw}
    return p("a red circle", refs=refs, **kw)


def test_a_weight_w_equals_the_neighbour_repeated_w_times(pipe):
    p, files = pipe
    a, b, c = (str(f) for f in files[:3])
    weighted = run(p, [(a, 3.0), b, (c, 2.0)])
    repeated = run(p, [a, a, a, b, c, c])
    assert np.abs(weighted.images - repeated.images).max() < 1e-4
    assert np.abs(weighted.images - run(p, [a, b, c]).images).max() > 1e-3  # the weights do something
    hits = weighted.provenance[0].neighbours
    assert sorted(h["weight"] for h in hits) == [1.0, 2.0, 3.0]


def test_weight_zero_equals_leaving_the_neighbour_out(pipe):
    p, files = pipe
    a, b, c = (str(f) for f in files[:3])
    assert np.abs(run(p, [(a, 0.0), b, c]).images - run(p, [b, c]).images).max() < 1e-4
    with pytest.raises(RDMError, match="weights"):
        run(p, [(a, -1.0), b])


def test_no_negatives_and_the_full_window_are_todays_guidance(pipe):
    p, files = pipe
    refs = [str(f) for f in files[:3]]
    today = run(p, refs)
    same = run(p, refs, control=NeighbourControl(negative_databases=None, negative_refs=(), window=(0.0, 1.0)))
    assert np.array_equal(today.images, same.images) and same.provenance[0].control == {}
    styled = run(p, refs, style_scale=2.0)
    assert np.array_equal(styled.images, run(p, refs, style_scale=2.0, control=NeighbourControl()).images)


def test_negative_refs_replace_the_unconditional_neighbours(pipe):
    p, files = pipe
    refs = [str(f) for f in files[:3]]
    negative = run(p, refs, control=NeighbourControl(negative_refs=(str(files[3]),)))
    assert np.abs(negative.images - run(p, refs).images).max() > 1e-3
    record = negative.provenance[0].control
    assert record["negative_refs"] == [str(files[3])] and record["negatives"][0][0]["ref"].endswith(files[3].name)
    prompt = run(p, refs, control=NeighbourControl(negative_prompt="a blue square"))
    assert np.abs(prompt.images - run(p, refs).images).max() > 1e-3
    assert prompt.provenance[0].control["negative_prompt"] == "a blue square"


def test_the_window_leaves_the_neighbours_out_of_the_steps_outside_it(pipe):
    p, files = pipe
    refs = [str(f) for f in files[:3]]
    seen = {}
    for label, kw in (("late", {"control": NeighbourControl(window=(0.5, 1.0))}), ("all", {}),
                      ("none", {"refs": None, "databases": "none"})):
        latents = []
        args = {**{"refs": refs}, **kw}
        if args.get("databases") == "none":
            out = p("a red circle", num_inference_steps=4, guidance_scale=3.0, seed=2, output_type="np",
                    neighbor_embeds=torch.zeros(1, 3, 32), callback=lambda i, t, x: latents.append(x.clone()))
        else:
            out = p("a red circle", num_inference_steps=4, guidance_scale=3.0, seed=2, output_type="np",
                    callback=lambda i, t, x: latents.append(x.clone()), **args)
        seen[label] = (latents, out.images)
    # the first two of four steps see the query alone: the same latents as no neighbours at all
    late, alone, everything = seen["late"][0], seen["none"][0], seen["all"][0]
    assert torch.allclose(late[1], alone[1], atol=1e-5) and not torch.allclose(late[1], everything[1], atol=1e-4)
    assert np.abs(seen["late"][1] - seen["none"][1]).max() > 1e-4  # then the neighbours act
    with pytest.raises(RDMError, match="window"):
        NeighbourControl(window=(0.6, 0.2))


def test_the_cli_takes_weighted_refs_diversity_and_negatives(pipe, tmp_path, home, tiny_clip):
    p, files = pipe
    make_folder(tmp_path / "pics", 10, seed=3)
    api.build_index(str(tmp_path / "pics"), name="pics", clip=tiny_clip, indexes=str(home), workers=0, progress=False)
    make_folder(tmp_path / "neg", 6, seed=9)
    api.build_index(str(tmp_path / "neg"), name="neg", clip=tiny_clip, indexes=str(home), workers=0, progress=False)
    model = str(p.name_or_path)
    common = ["--model", model, "--steps", "2", "--quiet", "--indexes", str(home)]
    result = CliRunner().invoke(cli, ["sample", "a red circle", "--db", "pics", "--diversity", "0.5", "--max-per",
                                      "id=1", "--negative-db", "neg", "--negative-prompt", "blurry",
                                      "--content-subtract", "0.5", "--neighbour-window", "0:0.8",
                                      "--neighbour-weights", "score", "--out", str(tmp_path / "o1"), *common],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads(next((tmp_path / "o1").glob("*.json")).read_text())
    control = record["control"]
    assert control["diversity"] == 0.5 and control["dedup"] == 0.95 and control["max_per"] == {"id": 1}
    assert control["negative_databases"] == ["neg"] and len(control["negatives"][0]) == 3
    assert control["content_subtract"] == 0.5 and control["window"] == [0.0, 0.8]
    assert all("weight" in h for h in record["neighbours"])
    refs = CliRunner().invoke(cli, ["sample", "a red circle", "--ref", f"{files[0]}:2", "--ref", str(files[1]),
                                    "--out", str(tmp_path / "o2"), *common], catch_exceptions=False)
    assert refs.exit_code == 0, refs.output
    weights = sorted(h["weight"] for h in json.loads(next((tmp_path / "o2").glob("*.json")).read_text())["neighbours"])
    assert weights == [1.0, 2.0]
    missing = CliRunner().invoke(cli, ["sample", "a red circle", "--ref", "nothere.png:2", "--out",
                                       str(tmp_path / "o3"), *common])
    assert missing.exit_code != 0 and "no such image file" in missing.output
