"""AdapterConfig: presets for every method, JSON round trip, and construction errors that say what to change."""

import json

import pytest

import jaxmoelora
from jaxmoelora.adapters.config import METHODS, PRESETS, AdapterConfig, preset
from jaxmoelora.errors import ConfigError
from jaxmoelora.models.decoder import init_model

from adapter_helpers import TINY


def test_every_method_has_a_preset_named_after_it():
    assert set(PRESETS) == set(METHODS)
    for name, config in PRESETS.items():
        assert config.method == name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_survives_a_json_round_trip(name):
    config = preset(name, target_modules=["q_proj", ".*mlp.*"])
    again = AdapterConfig.from_dict(json.loads(config.to_json()))
    assert again == config
    assert isinstance(again.target_modules, tuple)


def test_preset_overrides_are_validated_again():
    assert preset("loramoe", num_experts=8).num_experts == 8
    with pytest.raises(ConfigError, match="top_k"):
        preset("moelora", top_k=9)


def test_scaling_is_alpha_over_rank_or_over_sqrt_rank_with_rslora():
    assert AdapterConfig(rank=4, alpha=32.0).scaling == 8.0
    assert AdapterConfig(rank=4, alpha=32.0, use_rslora=True).scaling == 16.0


def test_top_k_above_the_expert_count_is_refused():
    with pytest.raises(ConfigError, match=r"top_k=3 must be between 0 \(dense\) and num_experts=2"):
        AdapterConfig(num_experts=2, top_k=3)


def test_loramoe_balancing_needs_an_even_number_of_experts():
    with pytest.raises(ConfigError, match="num_experts=5 must be even"):
        preset("loramoe", num_experts=5)
    assert preset("loramoe", num_experts=5, lbc_weight=0.0).num_experts == 5  # no constraint, no halves


def test_unknown_preset_and_unknown_method_name_the_choices():
    with pytest.raises(ConfigError, match="unknown adapter preset 'lorra'.*loramoe"):
        preset("lorra")
    with pytest.raises(ConfigError, match="method='dora' is unknown.*hydralora"):
        AdapterConfig(method="dora")


def test_unknown_field_in_from_dict_is_named():
    with pytest.raises(ConfigError, match=r"unknown adapter field\(s\) \['lora_rank'\]"):
        AdapterConfig.from_dict({"method": "lora", "lora_rank": 8})


def test_other_invalid_values_are_refused():
    for bad, match in [(dict(rank=0), "rank=0"), (dict(dropout=1.0), "dropout"), (dict(target_modules=()), "empty"),
                       (dict(num_identity_experts=1, num_experts=4), "ffn_moe"),
                       (dict(target_modules=("q_proj[",)), "not a valid regex"),
                       (dict(shared_a=True, num_experts=4, top_k=2), "shared_a"),
                       (dict(ffn_moe=True, num_experts=4, top_k=0), "top_k to at least 1")]:
        with pytest.raises(ConfigError, match=match):
            AdapterConfig(**bad)


def test_a_target_module_that_matches_nothing_lists_the_module_names():
    model = init_model(TINY)
    with pytest.raises(ConfigError, match=r"'qproj' matches no module.*model\.layers\.0\.self_attn\.q_proj.*"
                                          r"model\.layers\.0\.mlp\.down_proj"):
        jaxmoelora.apply_adapters(model, AdapterConfig(target_modules=("qproj",)))


def test_rank_larger_than_a_dimension_is_refused_with_the_limit():
    model = init_model(TINY)  # k_proj maps 32 -> 16
    with pytest.raises(ConfigError, match=r"rank=20 exceeds k_proj's smaller dimension 16 \(32 -> 16\)"):
        jaxmoelora.apply_adapters(model, AdapterConfig(target_modules=("k_proj",), rank=20))


def test_targets_are_matched_by_name_or_regex():
    from jaxmoelora.adapters.apply import targeted_linears
    assert targeted_linears(AdapterConfig(target_modules=("q_proj", "v_proj")), 2) == ["q_proj", "v_proj"]
    assert targeted_linears(AdapterConfig(target_modules=(".*mlp.*",)), 2) == ["gate_proj", "up_proj", "down_proj"]
    assert targeted_linears(AdapterConfig(target_modules=("self_attn.o_proj",)), 2) == ["o_proj"]


def test_applying_adapters_twice_is_refused():
    model = jaxmoelora.apply_adapters(init_model(TINY), "lora")
    with pytest.raises(ConfigError, match="already has adapters"):
        jaxmoelora.apply_adapters(model, "lora")
