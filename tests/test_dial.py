"""The calibrated dial: isotonic fit, the mix-to-alpha map, calibrate.py, sample.py --mix, and its report."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from abcgpt.core.checkpoint import load_checkpoint
from abcgpt.measuring.dial import fit_map, isotonic, mix_to_alpha

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_isotonic_by_hand():
    assert isotonic([1, 3, 2, 4]) == [1, 2.5, 2.5, 4]
    assert isotonic([3, 2, 1]) == [2, 2, 2]
    assert isotonic([0, 1, 2]) == [0, 1, 2]  # already monotone: unchanged
    assert isotonic([1, 0], weights=[3, 1]) == [0.75, 0.75]  # the heavier point pulls the pool


def test_fit_map_pools_a_dip_and_keeps_the_grid():
    scores = {0.0: [0.0, 0.0], 0.5: [0.6, 0.6], 0.25: [0.2, 0.2], 0.75: [0.4, 0.6], 1.0: [1.0, 1.0]}
    dial_map = fit_map(scores)
    assert dial_map["alpha"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert dial_map["p"] == pytest.approx([0.0, 0.2, 0.55, 0.55, 1.0])


def test_mix_to_alpha_inverts_the_curve():
    dial_map = {"alpha": [0.0, 0.25, 0.5, 0.75, 1.0], "p": [0.0, 0.2, 0.55, 0.55, 1.0]}
    assert mix_to_alpha(dial_map, 0.1) == pytest.approx(0.125)  # halfway between 0 and 0.25
    assert mix_to_alpha(dial_map, 0.55) == pytest.approx(0.625)  # a flat stretch: its middle
    assert mix_to_alpha(dial_map, 0.775) == pytest.approx(0.875)
    assert mix_to_alpha(dial_map, 0.0) == 0.0 and mix_to_alpha(dial_map, 1.0) == 1.0
    squashed = {"alpha": [0.0, 0.5, 1.0], "p": [0.1, 0.5, 0.9]}
    assert mix_to_alpha(squashed, 0.0) == 0.0 and mix_to_alpha(squashed, 1.0) == 1.0  # beyond the ends: the ends
    mixes = [i / 20 for i in range(21)]
    alphas = [mix_to_alpha(dial_map, m) for m in mixes]
    assert all(b >= a for a, b in zip(alphas, alphas[1:]))  # a monotone map


@pytest.fixture(scope="module")
def calibrated(trained_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("calibrated") / "ckpt.pt"
    shutil.copy(trained_checkpoint, path)
    result = run("calibrate.py", "--ckpt", path, "--samples", "3", "--grid", "5", "--sample_tokens", "20")
    assert result.returncode == 0, result.stderr
    return path


def test_calibrate_stores_a_monotone_map_and_keeps_the_rest(calibrated, trained_checkpoint):
    state, before = load_checkpoint(calibrated), load_checkpoint(trained_checkpoint)  # checksums verified
    dial_map = state["dial_map"]
    assert dial_map["alpha"] == [0.0, 0.25, 0.5, 0.75, 1.0] and dial_map["samples_per_alpha"] == 3
    assert all(b >= a for a, b in zip(dial_map["p"], dial_map["p"][1:]))
    assert state["step"] == before["step"] and state["model"].keys() == before["model"].keys()


def test_sample_with_a_mix_is_sampling_at_its_alpha(calibrated):
    """... at the temperature the map was calibrated at, which the map stores: there the mix holds."""
    state = load_checkpoint(calibrated)
    alpha = mix_to_alpha(state["dial_map"], 0.3)
    assert state["dial_map"]["temperature"] == 1.0 and state["dial_map"]["top_k"] is None
    common = ("sample.py", "--ckpt", calibrated, "--max_new_tokens", "25", "--seed", "5", "--start", "one day")
    by_mix, by_alpha = run(*common, "--mix", "0.3"), run(*common, "--alpha", repr(alpha), "--temperature", "1.0")
    assert by_mix.returncode == 0 and by_alpha.returncode == 0, by_mix.stderr + by_alpha.stderr
    assert by_mix.stdout.startswith(f"--- mix 0.3 (alpha {alpha:.3f})")
    assert by_mix.stdout.split("\n", 1)[1] == by_alpha.stdout.split("\n", 1)[1]


def test_a_mix_at_another_temperature_is_refused_unless_forced(calibrated):
    common = ("sample.py", "--ckpt", calibrated, "--max_new_tokens", "5", "--mix", "0.3")
    refused = run(*common, "--temperature", "0.8")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "calibrated at temperature 1.0" in refused.stderr and "force" in refused.stderr
    forced = run(*common, "--temperature", "0.8", "--force")
    assert forced.returncode == 0 and forced.stdout.startswith("--- mix 0.3")


def test_report_scores_the_calibrated_dial(calibrated, tmp_path):
    result = run("report.py", "--ckpt", calibrated, "--out_dir", tmp_path, "--samples", "2", "--sample_tokens", "20",
                 "--max_windows", "4")
    assert result.returncode == 0, result.stderr
    dial = json.loads((tmp_path / "report.json").read_text())["calibrated_dial"]
    assert dial["mixes"] == [round(0.1 * i, 1) for i in range(11)]
    assert len(dial["measured"]) == 11 and all(0 <= p <= 1 for p in dial["measured"])
    assert dial["max_abs_error"] == pytest.approx(max(abs(p - m) for p, m in zip(dial["measured"], dial["mixes"])))
    assert -1 <= dial["spearman_samples"] <= 1
    from abcgpt.measuring.ngram import spearman
    assert dial["spearman"] == pytest.approx(spearman(dial["mixes"], dial["measured"]))
    assert "## The calibrated dial" in (tmp_path / "report.md").read_text()
