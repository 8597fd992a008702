"""The toy chain's measurement runs end to end on a freshly exported (zero-initialised: undistilled) teacher, and
reports what an undistilled teacher must: at every w the single-pass error equals that of the model with w ignored,
and the two-pass samples and the teacher's own round trip come out as for the plain toy teacher."""

from __future__ import annotations

import json

import pytest

from editlab.experiments import toy_guidance_chain as chain
from editlab.icd.guidance_distillation import DistillSettings, GuidanceDistillationModule, WMixture
from editlab.icd.training import OptimSettings


@pytest.fixture(scope="module")
def undistilled_teacher(tmp_path_factory):
    mixture = WMixture(discrete=(2.0, 4.0, 6.5), high=6.5)
    module = GuidanceDistillationModule(chain.toy_components(), DistillSettings(mixture=mixture), OptimSettings())
    return module.export_teacher(tmp_path_factory.mktemp("toy_teacher"))


def test_the_chain_report_of_an_undistilled_teacher(undistilled_teacher, tmp_path, capsys):
    report = chain.main(["--teacher", str(undistilled_teacher), "--adapters", str(chain.WEIGHTS / "icd"),
                         "--images", "4", "--round-trip-images", "2", "--json", str(tmp_path / "report.json")])
    assert json.loads((tmp_path / "report.json").read_text())["images"] == 4
    errors = report["relative_error"]
    assert list(errors) == ["0", "2", "4", "6.5"]
    for w, e in errors.items():
        assert e["distilled"] == pytest.approx(e["w_ignored"], abs=1e-5), w  # zero init: the conditional model
    assert errors["0"]["w_ignored"] == 0 and errors["6.5"]["w_ignored"] > errors["2"]["w_ignored"] > 0
    for name in ("two_pass", "distilled"):
        assert 0 <= report[f"judged_w2_{name}"]["all_correct"] <= 1
    assert report["ddim50_round_trip_psnr"] > 28  # the plain teacher's 50 + 50 DDIM (32-34 dB on toy scenes)
    assert report["ddim50_round_trip_psnr_distilled"] == pytest.approx(report["ddim50_round_trip_psnr"], abs=0.05)
    # the shipped adapters on the undistilled export are the shipped adapters on the plain teacher
    assert report["icd_round_trip_psnr"] == pytest.approx(report["icd_round_trip_psnr_shipped_adapters"], abs=0.05)
    assert "relative single-pass error" in capsys.readouterr().out


def test_a_missing_teacher_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        chain.main(["--teacher", str(tmp_path / "nope.safetensors")])
    assert "nope.safetensors does not exist: train it first" in capsys.readouterr().err
