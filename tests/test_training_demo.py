"""`prefops demo` end to end: prep, DPO on a tiny LM, Diffusion-DPO on a tiny UNet, PNG of curves."""

import re

import pytest

pytest.importorskip("transformers")
pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")


def test_demo_trains_and_plots(tmp_path, capsys):
    from prefops.cli import main

    assert main(["demo", "--out", str(tmp_path), "--lm-steps", "24", "--unet-steps", "6"]) == 0
    out = capsys.readouterr().out
    lm = [float(x) for x in re.findall(r"lm step +\d+ +loss ([0-9.]+)", out)]
    unet = [float(x) for x in re.findall(r"unet step +\d+ +loss ([0-9.]+)", out)]
    assert len(lm) == 24 and len(unet) == 6
    assert abs(unet[0] - 0.6931) < 1e-3 and unet[-1] < 0.5 * unet[0]
    assert abs(lm[0] - 0.6931) < 1e-3  # the policy starts as its own reference
    assert sum(lm[-4:]) / 4 < 0.6 * lm[0]  # the tiny LM learns the training pairs
    accs = [float(x) for x in re.findall(r"reward acc ([0-9.]+)", out)]
    assert sum(accs[-4:]) / 4 > sum(accs[:4]) / 4
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (tmp_path / "reference_logps.parquet").exists() and (tmp_path / "hh_pairs.parquet").exists()
