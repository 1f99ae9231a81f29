"""The one home of the dial and the sampling settings: checks, defaults, and a mix that keeps its meaning."""
import re
from dataclasses import fields, replace
from pathlib import Path

import pytest

from abcgpt.core import limits
from abcgpt.core.errors import SettingsError
from abcgpt.measuring.dial import mix_to_alpha
from abcgpt.model.sampling import Sampling
from abcgpt.serving import api_input, settings
from abcgpt.tools import sample

MAP = {"alpha": [0.0, 0.5, 1.0], "p": [0.1, 0.5, 0.9], "temperature": 1.0, "top_k": None}


def sampling_check(name):
    """A check of one sampling setting, as settings.sampling makes it."""
    return lambda value, _: settings.sampling({name: value})


@pytest.mark.parametrize("check, value, message", [
    (settings.check_unit, 1.5, "alpha must be in [0, 1], got 1.5"),
    (settings.check_unit, float("nan"), "alpha must be in [0, 1], got nan"),
    (sampling_check("temperature"), 0.0, "temperature must be a number above 0 and at most 100, got 0.0"),
    (sampling_check("temperature"), float("inf"), "temperature must be a number above 0 and at most 100, got inf"),
    (sampling_check("temperature"), 1e300, "temperature must be a number above 0 and at most 100, got 1e+300"),
    (sampling_check("top_k"), 0, "top_k must be an integer from 1 to 1,048,576, got 0"),
    (sampling_check("top_k"), 10**30, "top_k must be an integer from 1 to 1,048,576, got 1000000000000000000000000000000"),
    (settings.check_seed, 2**63, "seed must be an integer from 0 to 2**63 - 1, got 9223372036854775808"),
    (settings.check_new_tokens, -1, "max_new_tokens must be an integer from 0 to 100,000, got -1"),
])
def test_each_check_names_the_setting_and_the_value(check, value, message):
    name = "alpha" if check is settings.check_unit else message.split()[0]
    with pytest.raises(SettingsError, match=re.escape(message)):
        check(value, name)


def test_a_mix_samples_at_the_settings_it_was_calibrated_at():
    alpha, sampling = settings.resolve_mix(0.3, MAP, {})
    assert alpha == mix_to_alpha(MAP, 0.3) and sampling == Sampling(1.0, None)


def test_another_temperature_breaks_a_mix_unless_forced():
    with pytest.raises(SettingsError, match="calibrated at temperature 1.0"):
        settings.resolve_mix(0.3, MAP, {"temperature": 0.8})
    assert settings.resolve_mix(0.3, MAP, {"temperature": 0.8, "top_k": 50}, force=True)[1] == Sampling(0.8, 50)


def test_maps_from_before_they_stored_their_settings_were_sampled_at_the_calibration_defaults():
    old = {"alpha": MAP["alpha"], "p": MAP["p"]}
    assert settings.calibrated_at(old) == Sampling(1.0, None)


def test_no_map_no_mix():
    with pytest.raises(SettingsError, match="no calibrated dial"):
        settings.resolve_mix(0.3, None, {})


def test_every_sampling_setting_reaches_every_front_door():
    """A setting added to Sampling is a flag of sample.py, a field of the API, an input of the page and a number
    with a range, with no other file to touch: this trips on a door that lists the settings by hand."""
    page = (Path(settings.__file__).parent / "page.html").read_text()
    for f in fields(Sampling):
        kind = settings.SAMPLING[f.name]
        value = {float: 0.5, int: 50}[kind]  # neither default
        args = sample.parse_args([f"--{f.name}", str(value)])
        assert settings.sampling(vars(args), prefix="--") == replace(settings.DEFAULTS, **{f.name: value})
        assert api_input.FIELDS[f.name] is kind
        assert f'id="{f.name}"' in page
        assert f.name in limits.LIMITS and f.name in settings.defaults()
