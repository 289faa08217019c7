"""Placements and search spaces: parsing, views, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from placement_search.errors import PlacementError
from placement_search.placement import (
    Placement,
    SearchSpace,
    load_placements,
    one_hot_matrix,
)

MIXERS = ("attention", "sliding_window", "gdn", "kda")


@pytest.fixture
def space() -> SearchSpace:
    return SearchSpace.uniform(8, MIXERS)


def test_parse_forms_agree(space: SearchSpace, tmp_path) -> None:
    names = ["attention", "gdn", "kda", "sliding_window", "attention", "attention", "gdn", "kda"]
    ref = Placement(names, space)
    assert Placement.parse("AGKSAAGK", space) == ref
    assert Placement.parse("agks aagk", space) == ref
    assert Placement.parse(",".join(names), space) == ref
    assert Placement.parse("fa,gdn,kda,swa,attn,full,GDN,K", space) == ref
    assert Placement.parse(json.dumps(names), space) == ref
    assert Placement.parse({"layers": names}, space) == ref
    (tmp_path / "p.json").write_text(json.dumps({"layers": names}))
    assert Placement.parse(str(tmp_path / "p.json"), space) == ref
    (tmp_path / "p.yaml").write_text("layers: [" + ", ".join(names) + "]\n")
    assert Placement.from_file(tmp_path / "p.yaml", space) == ref
    assert Placement.parse("attention*2,gdn*6", space).counts() == {
        "attention": 2, "sliding_window": 0, "gdn": 6, "kda": 0,
    }


def test_fast_llm_yaml_placements(space: SearchSpace, tmp_path) -> None:
    f = tmp_path / "placements.yaml"
    f.write_text("placements:\n  - [attention, attention, gdn, gdn, kda, kda, sliding_window, attention]\n"
                 "  - " + json.dumps(["gdn"] * 8) + "\n")
    ps = load_placements(f, space)
    assert [p.code() for p in ps] == ["AAGGKKSA", "GGGGGGGG"]


def test_views(space: SearchSpace) -> None:
    p = Placement.parse("AGKSAAGK", space)
    assert p.code() == str(p) == "AGKSAAGK"
    assert p.counts() == {"attention": 3, "sliding_window": 1, "gdn": 2, "kda": 2}
    oh = p.one_hot()
    assert oh.shape == (8, 4) and oh.sum() == 8 and (oh.sum(axis=1) == 1).all()
    assert oh[1, 2] == 1 and oh[3, 1] == 1
    assert p.to_string("runs") == "attention,gdn,kda,sliding_window,attention*2,gdn,kda"
    assert Placement.parse(p.to_string("runs"), space) == p
    assert Placement.parse(p.to_string("names"), space) == p
    x = one_hot_matrix([p, Placement.uniform("kda", space)])
    assert x.shape == (2, 32)
    np.testing.assert_array_equal(x[0], oh.reshape(-1))
    assert p.replace(0, "kda").code() == "KGKSAAGK"


def test_hash_and_equality_are_stable(space: SearchSpace) -> None:
    a = Placement.parse("AGKSAAGK", space)
    b = Placement(list(a.mixers), SearchSpace.uniform(8, MIXERS))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    # The key is a content hash: fixed across runs and machines.
    assert a.key == b.key
    assert a != Placement.parse("AGKSAAGG", space)
    with pytest.raises(AttributeError):
        a.mixers = ()  # type: ignore[misc]


def test_key_is_content_hash(space: SearchSpace) -> None:
    import hashlib

    p = Placement.parse("AAAAGGGG", space)
    assert p.key == hashlib.sha256(",".join(p.mixers).encode()).hexdigest()[:16]


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (["attention"] * 7 + ["bogus"], "layer 7: unknown mixer 'bogus'"),
        (["attention"] * 7, "has 7 layers, expected 8"),
        ("AAAAGGG", "has 7 layers, expected 8"),
        ("AAAAGGGX", "'X' is not a mixer letter"),
        ("attention*7,bogus", "layer 7: unknown mixer 'bogus'"),
        ("attention*x", "NAME*COUNT"),
        ("", "empty placement"),
        ([1] * 8, "layer 0: mixer must be a name"),
        ("attention*99999999", "larger than"),
    ],
)
def test_errors_name_layer_and_token(space: SearchSpace, value, needle) -> None:
    with pytest.raises(PlacementError) as e:
        Placement.parse(value, space)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_error_lists_valid_names(space: SearchSpace) -> None:
    with pytest.raises(PlacementError, match="valid: attention, sliding_window, gdn, kda"):
        Placement(["attention"] * 7 + ["bogus"], space)


def test_restricted_space() -> None:
    space = SearchSpace(3, MIXERS, (frozenset(MIXERS), frozenset({"attention", "gdn"}), frozenset(MIXERS)))
    assert space.size() == 4 * 2 * 4
    assert Placement.parse("AGK", space).code() == "AGK"
    with pytest.raises(PlacementError, match="layer 1: mixer 'kda' is not offered here; valid: attention, gdn"):
        Placement.parse("AKK", space)
    assert SearchSpace.from_dict(space.to_dict()) == space


def test_custom_mixers_and_letters() -> None:
    space = SearchSpace.uniform(4, ["attention", "mamba", "gdn"], letters={"mamba": "M"})
    assert space.letters == {"attention": "A", "mamba": "M", "gdn": "G"}
    assert Placement.parse("AMGM", space).mixers == ("attention", "mamba", "gdn", "mamba")
    # Names without a default letter get their first free letter.
    other = SearchSpace.uniform(2, ["alpha", "avocado"])
    assert other.letters == {"alpha": "A", "avocado": "V"}
    with pytest.raises(PlacementError, match="letter 'A' given to two mixers"):
        SearchSpace.uniform(2, ["x", "y"], letters={"x": "A", "y": "a"})


def test_space_errors() -> None:
    with pytest.raises(PlacementError, match="duplicate"):
        SearchSpace.uniform(2, ["a", "a"])
    with pytest.raises(PlacementError, match="num_layers"):
        SearchSpace.uniform(0, ["a"])
    with pytest.raises(PlacementError, match="layer 1 offers no mixer"):
        SearchSpace(2, ("a",), (frozenset({"a"}), frozenset()))
