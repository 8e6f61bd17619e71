"""GoRAConfig rejects bad options with an error that names the option and the valid range."""

import pytest

from gora_dist import GoRAConfig


def test_defaults_follow_the_paper():
    config = GoRAConfig()
    assert (config.importance, config.rank_features, config.rank_rounding) == ("mean_abs_wg", "sqrt", "round")
    assert (config.rank_ref, config.rank_min, config.rank_max) == (8, 4, 32)
    assert (config.alpha, config.gamma, config.use_rslora) == (16.0, 5e-2, True)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"rank_min": 9, "rank_max": 8, "rank_ref": 8}, "rank_min=9 > rank_max=8"),
        ({"rank_ref": 40}, "rank_ref=40 is outside"),
        ({"rank_ref": 2}, "rank_ref=2 is outside"),
        ({"gamma": -0.1}, "gamma=-0.1"),
        ({"gamma": float("nan")}, "gamma=nan"),
        ({"grad_steps": 0}, "grad_steps=0"),
        ({"importance": "fisher"}, "importance='fisher' is not one of"),
        ({"rank_features": "log"}, "rank_features='log'"),
        ({"rank_rounding": "nearest"}, "rank_rounding='nearest'"),
        ({"alpha": 0}, "alpha=0"),
        ({"target_modules": []}, "target_modules"),
        ({"rank_min": -1}, "rank_min=-1"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"adaptive_gamma_base": 1.5}, "adaptive_gamma_base=1.5"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        GoRAConfig(**options)


def test_round_trip_through_dict_and_unknown_keys():
    config = GoRAConfig(target_modules=["v_proj"], rank_ref=6, gamma=0.08)
    assert GoRAConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown GoRAConfig option\(s\) \['rank'\]"):
        GoRAConfig.from_dict({"rank": 8})
