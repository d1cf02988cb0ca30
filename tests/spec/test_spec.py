"""The spec: validation, error messages, overrides, loading from every source, the schema file."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evefx import Spec, SpecError, dump_spec, load_spec
from evefx.spec import SECTION_TYPES, QuantizeSection, json_schema

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_frozen():
    spec = load_spec({"passes": [{"kind": "quantize"}]})
    assert spec.schema_version == 1
    assert spec.passes[0].weight.bits == 8 and spec.passes[0].weight.granularity == "per_channel"
    with pytest.raises(Exception):
        spec.passes[0].fold_bn = False  # frozen


def test_every_problem_on_its_own_line_with_path():
    with pytest.raises(SpecError) as info:
        load_spec("passes:\n  - {kind: spike, timesteps: x}\n  - {kind: quantize, weight: {bits: 0}, colour: red}\n")
    err = info.value
    lines = str(err).splitlines()
    assert "passes[1].weight.bits: must be between 1 and 16 (got 0)" in lines
    assert "passes[0].timesteps: must be an integer (got 'x')" in lines
    assert any(line.startswith("passes[1].colour: unknown field") for line in lines)
    assert (("passes", 1, "weight", "bits"), "must be between 1 and 16 (got 0)") in err.errors


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(SpecError, match=r"passes\[0\]: unknown kind 'quantise'; valid kinds: 'quantize', 'spike', 'prune'"):
        load_spec({"passes": [{"kind": "quantise"}]})


def test_file_name_in_message(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("passes: [{kind: prune, ratio: 1.5}]\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert f"{path}: passes[0].ratio: must be between 0.0 and 0.99 (got 1.5)" in str(info.value)


def test_malformed_yaml_names_line(tmp_path):
    path = tmp_path / "broken.yml"
    path.write_text("passes:\n  - kind: prune\n   ratio: [\n")
    with pytest.raises(SpecError, match=r"broken.yml: <spec>: malformed YAML: line \d+, column \d+"):
        load_spec(str(path))


def test_missing_file():
    with pytest.raises(SpecError, match="cannot read spec file"):
        load_spec("does/not/exist.yaml")


def test_sources_agree(tmp_path):
    data = {"passes": [{"kind": "prune", "ratio": 0.25}]}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    specs = [load_spec(data), load_spec(json.dumps(data)), load_spec(path), load_spec(str(path)), load_spec(Spec(**data))]
    assert all(s == specs[0] for s in specs)
    assert load_spec(dump_spec(specs[0])) == specs[0]  # YAML round trip


def test_a_partly_written_block_keeps_its_role_defaults():
    # writing only the bits used to reset every other option to a bare quantizer's
    # (per-tensor weights, symmetric signed activations: W4A4 from random collapsed to 37% on one seed)
    section = load_spec({"passes": [{"kind": "quantize", "weight": {"bits": 4}, "activation": {"bits": 4}}]}).passes[0]
    w, a = section.weight, section.activation
    assert (w.bits, w.fn, w.granularity, w.tracker, w.symmetric, w.signed) == (4, "round", "per_channel", "global", True, True)
    assert (a.bits, a.fn, a.granularity, a.tracker, a.symmetric, a.signed) == (4, "lsq", "per_tensor", "average", False, False)
    assert section.weight == QuantizeSection(kind="quantize").weight.model_copy(update={"bits": 4})
    assert load_spec(dump_spec(load_spec({"passes": [section.model_dump(mode="json")]}))).passes[0] == section


def test_overrides_merge_nested_and_later_wins():
    spec = load_spec(
        {
            "passes": [
                {
                    "kind": "quantize",
                    "weight": {"bits": 4, "fn": "lsq"},
                    "overrides": [
                        {"names": ["features.*"], "weight": {"bits": 6}},
                        {"names": ["features.0"], "weight": {"bits": 8}, "activation": None},
                    ],
                }
            ]
        }
    )
    section = spec.passes[0]
    assert section.for_layer("features.3").weight.bits == 6
    assert section.for_layer("features.3").weight.fn == "lsq"  # merged, not replaced
    assert section.for_layer("features.0").weight.bits == 8
    assert section.for_layer("features.0").activation is None
    assert section.for_layer("classifier.1").weight.bits == 4


def test_override_errors_have_full_paths():
    with pytest.raises(SpecError) as info:
        load_spec({"passes": [{"kind": "quantize", "overrides": [{"names": ["a"], "weight": {"bits": 40}}, {"weight": {}}, {"names": ["b"], "select": {}}]}]})
    paths = [p for p, _ in info.value.errors]
    assert ("passes", 0, "overrides", 0, "weight", "bits") in paths
    assert ("passes", 0, "overrides", 1, "names") in paths
    assert ("passes", 0, "overrides", 2, "select") in paths


def test_cross_field_rules():
    with pytest.raises(SpecError, match="min_bits .* must not exceed max_bits"):
        load_spec({"passes": [{"kind": "quantize", "min_bits": 8, "max_bits": 4}]})
    with pytest.raises(SpecError, match="nothing to quantize"):
        load_spec({"passes": [{"kind": "quantize", "weight": None, "activation": None}]})
    with pytest.raises(SpecError, match="not a valid regular expression"):
        load_spec({"passes": [{"kind": "prune", "select": {"regex": "("}}]})
    with pytest.raises(SpecError, match="schema_version"):
        load_spec({"schema_version": 2})


def test_schema_file_is_current():
    on_disk = json.loads((ROOT / "schemas" / "evefx-spec.schema.json").read_text())
    assert on_disk == json_schema(), "schemas/evefx-spec.schema.json is stale: run `make schema`"


def test_schema_documents_fields():
    text = json.dumps(json_schema())
    assert "Bit width, 1 to 16" in text and '"maximum": 16' in text
    for section in SECTION_TYPES:
        assert section.__name__ in text


def test_spec_module_does_not_import_torch():
    code = "import sys, evefx.cli, evefx; evefx.load_spec('passes: [{kind: prune}]'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_example_specs_validate():
    files = sorted((ROOT / "examples" / "specs").glob("*.yaml"))
    assert files
    for f in files:
        load_spec(f)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 40) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
section_like = st.fixed_dictionaries(
    {"kind": st.sampled_from(["quantize", "spike", "prune", "nope", 3])},
    optional={
        "weight": json_values, "activation": json_values, "select": json_values, "overrides": json_values,
        "ratio": json_values, "timesteps": json_values, "neuron": json_values, "schedule": json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.fixed_dictionaries({}, optional={"passes": st.lists(section_like, max_size=3) | json_values, "trace": json_values, "search": json_values, "schema_version": json_values})))
def test_random_input_raises_only_spec_error(data):
    try:
        load_spec(data) if isinstance(data, dict) else load_spec({"passes": data})
    except SpecError:
        pass


@pytest.mark.parametrize("empty", [None, "", {}, "\n"])
def test_empty_spec_is_an_error(empty):
    """Issue 12, item 1: an empty spec used to validate "ok" and transform to nothing."""
    with pytest.raises(SpecError) as info:
        load_spec(empty)
    assert str(info.value).splitlines()[1] == (
        f"<spec>: the spec is empty (got {empty!r}); write at least `schema_version: 1` and `passes: [...]` "
        "(`passes: []` for a spec that changes nothing)")


def test_empty_spec_file_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).splitlines()[1] == (
        f"{path}: <spec>: the file is empty; write at least `schema_version: 1` and `passes: [...]` "
        "(`passes: []` for a spec that changes nothing)")
    assert load_spec({"passes": []}).passes == ()  # an explicit "change nothing" spec is fine


def test_missing_schema_version_in_a_file_warns_with_the_assumed_version(tmp_path):
    from evefx import EvefxWarning

    path = tmp_path / "s.yaml"
    path.write_text("passes: [{kind: prune}]\n")
    with pytest.warns(EvefxWarning, match=r"s\.yaml: no schema_version; assuming schema_version: 1"):
        assert load_spec(path).schema_version == 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_spec("schema_version: 1\npasses: [{kind: prune}]\n")
        load_spec({"passes": [{"kind": "prune"}]})  # a dict built in Python is the current version


def test_training_default_options_round_trip_and_check():
    spec = load_spec({"schema_version": 1, "passes": [
        {"kind": "spike"},
        {"kind": "quantize", "weight": {"bits": 2, "fn": "lsq", "init_steps": 30,
                                        "progressive": {"start_bits": 8, "steps": 200}}, "keep_first_last": 8},
    ]})
    spike, quant = spec.passes
    assert (spike.neuron.threshold, spike.neuron.threshold_std, spike.neuron.surrogate.relative) == (None, 1.0, True)
    assert quant.weight.bits_schedule() == ((0, 8), (100, 4), (200, 2))
    assert quant.activation.bits_schedule() is None and quant.keep_first_last == 8
    assert load_spec(dump_spec(spec)) == spec
    with pytest.raises(SpecError, match="start_bits .8. must exceed bits .8."):
        load_spec({"schema_version": 1, "passes": [{"kind": "quantize", "weight": {"progressive": {}}}]})
    with pytest.raises(SpecError, match="upgrade_bits and progressive"):
        load_spec({"schema_version": 1, "passes": [{"kind": "quantize", "upgrade_bits": True,
                                                    "weight": {"bits": 4, "progressive": {}}}]})
