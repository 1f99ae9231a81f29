"""The one home of the dial and the sampling settings: checks, defaults, and a mix that keeps its meaning."""
import re

import pytest

from abcgpt import settings
from abcgpt.dial import mix_to_alpha
from abcgpt.errors import SettingsError

MAP = {"alpha": [0.0, 0.5, 1.0], "p": [0.1, 0.5, 0.9], "temperature": 1.0, "top_k": None}


@pytest.mark.parametrize("check, value, message", [
    (settings.check_unit, 1.5, "alpha must be in [0, 1], got 1.5"),
    (settings.check_unit, float("nan"), "alpha must be in [0, 1], got nan"),
    (settings.check_temperature, 0.0, "temperature must be a number above 0 and at most 100, got 0.0"),
    (settings.check_temperature, float("inf"), "temperature must be a number above 0 and at most 100, got inf"),
    (settings.check_temperature, 1e300, "temperature must be a number above 0 and at most 100, got 1e+300"),
    (settings.check_top_k, 0, "top_k must be an integer from 1 to 1,048,576, got 0"),
    (settings.check_top_k, 10**30, "top_k must be an integer from 1 to 1,048,576, got 1000000000000000000000000000000"),
    (settings.check_seed, 2**63, "seed must be an integer from 0 to 2**63 - 1, got 9223372036854775808"),
    (settings.check_new_tokens, -1, "max_new_tokens must be an integer from 0 to 100,000, got -1"),
])
def test_each_check_names_the_setting_and_the_value(check, value, message):
    name = "alpha" if check is settings.check_unit else message.split()[0]
    with pytest.raises(SettingsError, match=re.escape(message)):
        check(value, name)


def test_a_mix_samples_at_the_settings_it_was_calibrated_at():
    alpha, temperature, top_k = settings.resolve_mix(0.3, MAP, None, None)
    assert alpha == mix_to_alpha(MAP, 0.3) and (temperature, top_k) == (1.0, None)


def test_another_temperature_breaks_a_mix_unless_forced():
    with pytest.raises(SettingsError, match="calibrated at temperature 1.0"):
        settings.resolve_mix(0.3, MAP, 0.8, None)
    assert settings.resolve_mix(0.3, MAP, 0.8, 50, force=True)[1:] == (0.8, 50)


def test_maps_from_before_they_stored_their_settings_were_sampled_at_the_calibration_defaults():
    old = {"alpha": MAP["alpha"], "p": MAP["p"]}
    assert settings.calibrated_at(old) == {"temperature": 1.0, "top_k": None}


def test_no_map_no_mix():
    with pytest.raises(SettingsError, match="no calibrated dial"):
        settings.resolve_mix(0.3, None, None, None)
