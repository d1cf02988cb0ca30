"""Selectors resolve to a plan, with documented precedence and errors that name things."""
from __future__ import annotations

import pytest
from torch import fx, nn

from evefx import PlanError, load_spec
from evefx.plan import plan_section, type_matches


def plan(gm, section_dict):
    section = load_spec({"passes": [section_dict]}).passes[0]
    return list(plan_section(gm, section, "passes[0]"))


@pytest.fixture
def gm(demo_net):
    return fx.symbolic_trace(demo_net)


def test_default_selects_conv_and_linear(gm):
    assert plan(gm, {"kind": "quantize"}) == ["features.0", "features.3", "features.6", "classifier.1", "classifier.3"]


def test_exclude_last_drops_the_classifier(gm):
    assert plan(gm, {"kind": "prune"})[-1] == "classifier.1"  # prune excludes the last layer by default


def test_types_names_regex_are_anded_and_exclude_applies_last(gm):
    assert plan(gm, {"kind": "quantize", "select": {"types": ["Linear"]}}) == ["classifier.1", "classifier.3"]
    assert plan(gm, {"kind": "quantize", "select": {"types": ["Conv2d", "Linear"], "names": ["features.*"]}}) == ["features.0", "features.3", "features.6"]
    assert plan(gm, {"kind": "quantize", "select": {"names": ["features.*"], "regex": r".*\.[03]"}}) == ["features.0", "features.3"]
    assert plan(gm, {"kind": "quantize", "select": {"names": ["features.*"], "exclude": ["features.3"]}}) == ["features.0", "features.6"]
    assert plan(gm, {"kind": "quantize", "select": {"types": ["torch.nn.Linear"]}}) == ["classifier.1", "classifier.3"]


def test_type_matches_subclasses_and_dotted_paths():
    class MyConv(nn.Conv2d):
        pass

    m = MyConv(1, 1, 1)
    assert type_matches(m, "Conv2d") and type_matches(m, "MyConv") and type_matches(m, "torch.nn.modules.conv.Conv2d")
    assert not type_matches(m, "Linear")


def test_nothing_matches_names_spec_path_and_candidates(gm):
    with pytest.raises(PlanError, match=r"passes\[0\]\.select matches no layer; candidates: features\.0 \(Conv2d\)"):
        plan(gm, {"kind": "quantize", "select": {"names": ["nope.*"]}})


def test_unsupported_type_is_an_error(gm):
    with pytest.raises(PlanError, match=r"matched features\.1 \(BatchNorm2d\).*attaches only to"):
        plan(gm, {"kind": "quantize", "select": {"types": ["BatchNorm2d"]}})


def test_override_matching_nothing_is_an_error(gm):
    with pytest.raises(PlanError, match=r"passes\[0\]\.overrides\[0\]\.names \['fc\*'\] match no selected layer"):
        plan(gm, {"kind": "quantize", "overrides": [{"names": ["fc*"], "weight": {"bits": 4}}]})


def test_only_last_layer_with_exclude_last(gm):
    with pytest.raises(PlanError, match="exclude_last leaves out"):
        plan(gm, {"kind": "prune", "select": {"names": ["classifier.3"]}})


def test_effective_section_per_layer(gm):
    section = load_spec({"passes": [{"kind": "quantize", "overrides": [{"names": ["classifier.*"], "weight": {"bits": 4}}]}]}).passes[0]
    p = plan_section(gm, section, "passes[0]")
    assert p["classifier.1"].section.weight.bits == 4 and p["features.0"].section.weight.bits == 8
