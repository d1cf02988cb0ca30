"""Selectors resolve to a plan, with documented precedence and errors that name things."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import fx, nn

import evefx

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
        plan(gm, {"kind": "quantize", "select": {"names": ["features.*"], "regex": "classifier.*"}})


def test_misspelt_type_is_an_error_with_suggestion(gm):
    """Issue 12, item 2: `types: [Conv2d, Linaer]` used to quantize the convs only, without a word."""
    with pytest.raises(PlanError) as err:
        plan(gm, {"kind": "quantize", "select": {"types": ["Conv2d", "Linaer"]}})
    assert str(err.value) == (
        "passes[0].select.types: unknown class name 'Linaer' (no module of the model and no torch.nn class is "
        "called that); did you mean 'Linear', 'LazyLinear'? write a class name such as Conv2d or a dotted path")
    with pytest.raises(PlanError, match=r"^passes\[0\]\.select\.types: cannot import class 'torch\.nn\.Linaer'"):
        plan(gm, {"kind": "quantize", "select": {"types": ["torch.nn.Linaer"]}})
    # a real torch.nn class the model does not use is fine (a spec may serve several models)
    assert plan(gm, {"kind": "quantize", "select": {"types": ["Conv1d", "Linear"]}}) == ["classifier.1", "classifier.3"]


def test_globs_that_match_no_layer_are_errors(gm):
    """Issue 12, item 2: an exclude (or names) glob that matches nothing is a typo, not a no-op."""
    with pytest.raises(PlanError) as err:
        plan(gm, {"kind": "quantize", "select": {"exclude": ["fetures.0"]}})
    assert str(err.value) == (
        "passes[0].select.exclude: 'fetures.0' matches no layer; did you mean 'features.0'? "
        "candidates: features.0, features.3, features.6, classifier.1, classifier.3")
    with pytest.raises(PlanError, match=r"^passes\[0\]\.select\.names: 'nope\.\*' matches no layer; "):
        plan(gm, {"kind": "quantize", "select": {"names": ["features.*", "nope.*"]}})
    # a regular expression written where a glob goes gets the glob it meant
    with pytest.raises(PlanError) as err:
        plan(gm, {"kind": "quantize", "select": {"exclude": [".*classifier.*"]}})
    assert str(err.value).startswith(
        "passes[0].select.exclude: '.*classifier.*' matches no layer; it reads like a regular expression, but "
        "exclude takes shell globs ('*classifier*'; or write select.regex); ")


def test_a_long_candidate_list_is_cut_to_twenty_names():
    traced = fx.symbolic_trace(nn.Sequential(*[nn.Linear(4, 4) for _ in range(30)]))
    with pytest.raises(PlanError) as err:
        plan(traced, {"kind": "quantize", "select": {"names": ["nope"]}})
    message = str(err.value)
    assert message.endswith("candidates: " + ", ".join(str(i) for i in range(20)) + ", ... (10 more)")
    assert "\n" not in message


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


class _DoubledConv(nn.Conv2d):
    def forward(self, x):
        return 2.0 * super().forward(x)


def test_a_layer_fx_traces_into_is_named_in_a_warning_not_skipped_silently():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), _DoubledConv(4, 4, 1)).eval(), torch.rand(2, 1, 6, 6)
    with pytest.warns(evefx.EvefxWarning, match=r"^passes\[0\]: 2 is not called as layers in the traced graph \(a "
                                                 r"function reads their weights"):
        gm = evefx.transform(model, {"passes": [{"kind": "quantize", "exclude_last": False}]}, x)
    assert [n for n, m in gm.named_modules() if type(m).__name__ == "QuantConv2d"] == ["0"]
    evefx.set_mode(gm, quantized=False)
    assert torch.allclose(gm(x), model(x), atol=1e-6)  # the doubling is kept
    with warnings.catch_warnings():
        warnings.simplefilter("error", evefx.EvefxWarning)
        evefx.transform(model, {"passes": [{"kind": "quantize", "select": {"names": ["0"]}}]}, x)
