"""The restyle measurement's bookkeeping (rdm.demo.restyle): inputs, per-strength accuracies, the table."""

import pytest

from rdm.demo.restyle import RestyleConfig, restyle_inputs, restyle_markdown, strength_row
from rdm.errors import RDMError


def test_inputs_are_unseen_toy_art_whose_content_differs_between_source_styles():
    items = restyle_inputs(["flat", "neon"], 2)
    assert [i["style"] for i in items] == ["flat", "flat", "neon", "neon"]
    assert len({i["index"] for i in items}) == 4 and min(i["index"] for i in items) >= 76_000_000
    # the same index would draw the same shape and colour in any style: each style gets its own indices
    assert [(i["shape"], i["colour"]) for i in items[:2]] != [(i["shape"], i["colour"]) for i in items[2:]]
    assert all(i["caption"] == f"a{'n' if i['colour'][0] in 'aeiou' else ''} {i['colour']} {i['shape']}"
               for i in items)
    assert restyle_inputs(["flat"], 1)[0]["image"].tobytes() == items[0]["image"].tobytes()  # deterministic


def test_a_strength_row_counts_style_swap_content_and_both_per_restyle():
    samples = [
        {"target": "neon", "source": "flat", "centroid_style": "neon", "shape": "star", "colour": "red",
         "pred_shape": "star", "pred_colour": "red"},  # swapped, content kept
        {"target": "neon", "source": "flat", "centroid_style": "flat", "shape": "star", "colour": "red",
         "pred_shape": "star", "pred_colour": "red"},  # kept its own style
        {"target": "mosaic", "source": "flat", "centroid_style": "mosaic", "shape": "star", "colour": "red",
         "pred_shape": "circle", "pred_colour": "red"},  # swapped, shape lost
        {"target": "mosaic", "source": "flat", "centroid_style": "neon", "shape": "star", "colour": "red",
         "pred_shape": "star", "pred_colour": "blue"},  # wrong style, colour lost
    ]
    row = strength_row(samples, 0.6)
    assert row == {"strength": 0.6, "n": 4, "style_swap": 0.5, "content": 0.5, "shape": 0.75, "colour": 0.75,
                   "both": 0.25, "source_style": 0.25}
    table = restyle_markdown({"rows": [row]})
    assert "| 0.6 | 50.0% | 50.0% | 25.0% | 25.0% |" in table


def test_strengths_outside_0_1_are_refused():
    with pytest.raises(RDMError, match="strengths"):
        RestyleConfig(strengths=(0.5, 1.2))
    with pytest.raises(RDMError, match="inputs_per_style"):
        RestyleConfig(inputs_per_style=0)
