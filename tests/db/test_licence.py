"""Licence rules: items outside a collection's allowed licences never condition a sample, even when they are the
nearest; search still shows them, marked; provenance and content credentials carry the credits (rdm.db.licence)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rdm import api
from rdm.db.licence import LicenceRule, generation_where, read_rule
from rdm.errors import RDMError
from rdm.models.tiny import make_tiny_rdm
from rdm.sampling.credentials import read
from rdm.sampling.pipeline import RDMPipeline
from tests.helpers.world import make_folder
from tests.helpers.world import run_cli as rdm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip):
    """12 pictures, the first half all-rights-reserved, the rest cc0 / cc-by with credits; a tiny model."""
    root = tmp_path_factory.mktemp("licence")
    names = make_folder(root / "pics", 12, seed=700)
    with open(root / "pics" / "metadata.jsonl", "w") as f:
        for i, name in enumerate(names):
            licence = "all-rights-reserved" if i < 6 else ("cc0" if i % 2 else "cc-by")
            f.write(json.dumps({"file_name": name, "licence": licence, "credit": f"artist {i}"}) + "\n")
    home = root / "indexes"
    rdm("--indexes", home, "build-index", root / "pics", "--name", "art", "--clip", tiny_clip, "--workers", 0,
        "--licence-column", "licence", "--allow-licence", "cc0,cc-by", "--attribution-column", "credit")
    identity = api.load_embedder(tiny_clip).identity.to_dict()
    pipe = RDMPipeline.from_pretrained(make_tiny_rdm(root / "model", identity, k=3))
    pipe.set_progress_bar_config(disable=True)
    return {"root": root, "home": home, "pipe": pipe, "names": names}


def test_disallowed_items_never_condition_a_sample_even_when_nearest(world):
    db = api.open_database("art", world["home"])
    assert db.licence_rule == LicenceRule("licence", ("cc0", "cc-by"), "credit")
    # query by the stored vectors of disallowed items: they are their own nearest neighbours
    rows = db.rows_of([f"{n}" for n in world["names"][:3]])
    queries = db.vectors_at(np.array(sorted(rows.values())))
    searched = db.search(queries, k=3)
    assert [h["licence"] for h in searched.hits(0)][0] == "all-rights-reserved"  # search shows it ...
    assert searched.hits(0)[0]["licence_allowed"] is False  # ... marked
    out = world["pipe"](query_embeds=queries, databases="art", indexes=str(world["home"]), k=3, seed=0,
                        num_inference_steps=2)
    for record in out.provenance:
        assert len(record.neighbours) == 3
        assert all(h["licence"] in ("cc0", "cc-by") for h in record.neighbours)
        assert record.attributions == list(dict.fromkeys(h["attribution"] for h in record.neighbours))
        assert all(a.startswith("artist ") and int(a.split()[1]) >= 6 for a in record.attributions)
        assert record.databases[0]["licence_rule"]["allow"] == ["cc0", "cc-by"]


def test_the_rule_changes_later_and_a_filter_cannot_widen_it(world, tmp_path):
    home = world["home"]
    assert "only items whose licence is cc0, cc-by" in rdm("--indexes", home, "licence", "art").output
    rdm("--indexes", home, "licence", "art", "--column", "licence", "--allow", "cc0")
    out = world["pipe"]("a red circle", databases="art", indexes=str(home), k=3, seed=0, num_inference_steps=2)
    assert {h["licence"] for h in out.provenance[0].neighbours} == {"cc0"}
    # asking for disallowed items through --where finds none rather than using them
    with pytest.raises(RDMError, match="no neighbours"):
        world["pipe"]("a red circle", databases="art", indexes=str(home), k=3, seed=0, num_inference_steps=2,
                      where={"licence": ["all-rights-reserved"]})
    assert generation_where(LicenceRule("licence", ("cc0",)), {"licence": ["cc0", "x"]}) == {"licence": ["cc0"]}
    # the content credentials of a sample name each neighbour's licence and credit
    result = rdm("--indexes", home, "sample", "a red circle", "--db", "art", "--model", world["root"] / "model",
                 "--out", tmp_path / "o", "--steps", 2, "--quiet")
    found = read(tmp_path / "o" / "a-red-circle-0.png")
    assert {i["licence"] for i in found.ingredients} == {"cc0"} and all("attribution" in i for i in found.ingredients)
    assert "content credentials" in result.output
    rdm("--indexes", home, "licence", "art", "--clear")
    assert read_rule(api.open_database("art", home).path) is None
    rdm("--indexes", home, "licence", "art", "--column", "licence", "--allow", "cc0,cc-by", "--attribution-column",
        "credit")


def test_bad_rules_are_refused_clearly(world, tmp_path):
    home = world["home"]
    assert "has no column 'licens'" in rdm("--indexes", home, "licence", "art", "--column", "licens", "--allow",
                                          "cc0", ok=False).output
    assert "at least one allowed licence" in rdm("--indexes", home, "licence", "art", "--column", "licence",
                                                 ok=False).output
    assert "needs both --licence-column and --allow-licence" in rdm(
        "--indexes", home, "build-index", world["root"] / "pics", "--name", "x", "--licence-column", "licence",
        ok=False).output
    folder = api.open_database("art", home).path
    saved = (folder / "licence.json").read_text()
    try:
        (folder / "licence.json").write_text('{"column": 3}')
        with pytest.raises(RDMError, match="licence.json is not a rule"):
            api.open_database("art", home)
    finally:
        (folder / "licence.json").write_text(saved)
