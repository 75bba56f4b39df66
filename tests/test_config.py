"""config.json in, config.json out: nested and flat layouts, derived values, unknown keys kept."""

import pytest

from qwenlite.config import ModelConfig, preset_config
from qwenlite.errors import QwenliteError


def test_nested_config_unwraps_text_config_and_takes_the_wrappers_tying():
    raw = {
        "model_type": "qwen3_5",
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "qwen3_5_text",
            "hidden_size": 64,
            "num_hidden_layers": 8,
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_theta": 1234.0, "partial_rotary_factor": 0.5, "mrope_section": [1, 1, 1]},
        },
    }
    c = ModelConfig.from_dict(raw)
    assert c.tie_word_embeddings is True
    assert (c.rope_theta, c.rotary_dim) == (1234.0, 128)
    assert c.layer_types == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + [
        "full_attention"
    ]


def test_flat_config_round_trips_with_unknown_keys():
    raw = {"model_type": "qwen3_5_text", "hidden_size": 64, "pad_token_id": 5, "some_future_key": [1, 2]}
    out = ModelConfig.from_dict(raw).to_dict()
    assert out["pad_token_id"] == 5 and out["some_future_key"] == [1, 2]
    assert ModelConfig.from_dict(out) == ModelConfig.from_dict(raw)


def test_unknown_model_type_names_the_supported_ones():
    with pytest.raises(QwenliteError, match="qwen3_5") as err:
        ModelConfig.from_dict({"model_type": "llama"})
    assert "llama" in str(err.value)


def test_presets_have_the_published_shapes():
    c = preset_config("qwen3.5-4b")
    assert (c.hidden_size, c.num_hidden_layers, c.linear_num_value_heads, c.linear_conv_dim) == (2560, 32, 32, 8192)
    assert c.layer_types.count("full_attention") == 8
    assert not preset_config("qwen3.5-9b").tie_word_embeddings
