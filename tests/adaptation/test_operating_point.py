"""Site operating points: they survive save and load, ``evaluate`` scores a site at its own, a site
without one gets the global threshold and a line saying so, and one fitted for other weights is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedfreeze.cli import main
from fedfreeze.evaluate import evaluate_model
from fedfreeze.model_io import load_model, model_scores, model_sha256, read_card, save_model
from fedfreeze.operating_point import OperatingPoint, Promise, ScoreCalibration, state_sha256
from tests.adaptation.conftest import STORED_THRESHOLD


def with_points(model_dir: Path, out: Path, points: list[OperatingPoint], local: str | None) -> Path:
    model, card = load_model(model_dir)
    card = card.model_copy(update={"operating_points": {p.site: p for p in points}, "local_site": local})
    return save_model(out, model, card)


def point(site: str, threshold: float, sha: str, calibration: ScoreCalibration | None = None) -> OperatingPoint:
    return OperatingPoint(
        site=site,
        threshold=threshold,
        calibration=calibration,
        rule="binormal",
        evidence="labelled-patients",
        labels_used=True,
        model_sha256=sha,
        n_images=40,
        n_patients=30,
        n_positive_patients=15,
        n_negative_patients=15,
        threshold_ci=(threshold - 0.05, threshold + 0.05),
        promise=Promise(balanced_accuracy=0.9, balanced_accuracy_ci=(0.8, 0.95)),
    )


def test_state_hash_follows_the_values_not_the_order() -> None:
    a = {"x": torch.zeros(3), "y": torch.ones(2)}
    b = {"y": torch.ones(2), "x": torch.zeros(3)}
    assert state_sha256(a) == state_sha256(b)
    c = {"x": torch.zeros(3), "y": torch.tensor([1.0, 1.0 + 1e-6])}
    assert state_sha256(a) != state_sha256(c)
    assert state_sha256(a) != state_sha256({"x": torch.zeros(3, dtype=torch.float64), "y": torch.ones(2)})


@pytest.mark.slow
def test_operating_points_survive_save_and_load_and_evaluate_uses_them(
    model_dir: Path, test_set, test_scores, tmp_path: Path
) -> None:
    from fedfreeze.sample_data import kermany_mini

    model, _ = load_model(model_dir)
    sha = model_sha256(model)
    calibration = ScoreCalibration(method="platt", a=0.8, b=0.4)
    folder = with_points(
        model_dir, tmp_path / "m", [point("a", 0.7, sha, calibration), point("b", 0.2, sha)], local="a"
    )
    card = read_card(folder)
    assert set(card.operating_points) == {"a", "b"} and card.local_site == "a"
    assert card.operating_points["a"].calibration == calibration
    assert card.threshold == pytest.approx(STORED_THRESHOLD)  # the global threshold is untouched
    assert "| a | 0.7" in (folder / "MODEL_CARD.md").read_text()

    y = test_set.labels.numpy() == 1
    data = kermany_mini("test")
    for site, t, cal in (("a", 0.7, calibration), ("b", 0.2, None), (None, 0.7, calibration)):
        result = evaluate_model(folder, data, bootstrap=0, site=site)
        scores = cal.apply(test_scores) if cal is not None else test_scores
        decided = scores >= t
        assert result["threshold"] == pytest.approx(t)
        assert (result["tp"], result["fp"]) == (int((decided & y).sum()), int((decided & ~y).sum()))
        assert result["operating_point"]["validated_at_site"] is True
    other = evaluate_model(folder, data, bootstrap=0, site="elsewhere")
    decided = test_scores >= STORED_THRESHOLD
    assert (other["tp"], other["fp"]) == (int((decided & y).sum()), int((decided & ~y).sum()))
    assert other["operating_point"]["validated_at_site"] is False
    assert "not validated at site 'elsewhere'" in other["operating_point"]["line"]
    assert "operating points held for: a, b" in other["operating_point"]["line"]


@pytest.mark.slow
def test_a_folder_without_operating_points_says_its_threshold_was_not_validated(model_dir: Path, capsys) -> None:
    from fedfreeze.sample_data import kermany_mini

    assert main(["evaluate", "--model", str(model_dir), "--data", str(kermany_mini("test")), "--bootstrap", "0"]) == 0
    out = capsys.readouterr().out
    assert "is the global model's and was not validated at this site" in out
    assert "(the global model's, not validated at this site)" in out


def test_an_operating_point_for_other_weights_is_refused(model_dir: Path, tmp_path: Path, capsys) -> None:
    from fedfreeze.sample_data import kermany_mini

    folder = with_points(model_dir, tmp_path / "m", [point("a", 0.5, "0" * 64)], local="a")
    code = main(["evaluate", "--model", str(folder), "--data", str(kermany_mini("test")), "--bootstrap", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "the operating point of site 'a' was fitted for weights 000000000000, not these" in err


def test_scores_at_a_site_apply_its_calibration_after_the_cards(model_dir: Path, test_set) -> None:
    model, card = load_model(model_dir)
    raw = model_scores(model, card, test_set.images[:8], torch.device("cpu"))
    cal = ScoreCalibration(method="temperature", a=2.0)
    shifted = cal.apply(raw)
    assert np.all((shifted > 0.5) == (raw > 0.5)) and not np.allclose(shifted, raw)


@pytest.mark.parametrize(
    "own", [None, ScoreCalibration(method="temperature", a=1.7), ScoreCalibration(method="platt", a=0.6, b=-0.4)]
)
@pytest.mark.parametrize(
    "card_cal", [ScoreCalibration(method="temperature", a=0.5), ScoreCalibration(method="platt", a=1.3, b=0.7)]
)
def test_a_point_fitted_on_raw_scores_keeps_its_decisions_after_the_cards_calibration(
    own: ScoreCalibration | None, card_cal: ScoreCalibration
) -> None:
    """A federation's sites fit on raw scores; the export adds a pooled temperature before theirs applies."""
    from fedfreeze.operating_point import InUse, after_card_calibration

    raw = np.random.default_rng(0).random(500)
    fitted = point("a", 0.62, "sha", own)
    at_site = fitted.calibration.apply(raw) if fitted.calibration is not None else raw  # as the site fitted it
    moved = after_card_calibration(fitted, card_cal)
    use = InUse(moved.threshold, moved.calibration, "a", moved, True, "")
    scored = use.apply(card_cal.apply(raw))  # what evaluate does: the card's calibration, then the site's
    np.testing.assert_allclose(scored, at_site, atol=1e-9)
    assert np.array_equal(scored >= moved.threshold, at_site >= fitted.threshold)
    naive = InUse(fitted.threshold, fitted.calibration, "a", fitted, True, "").apply(card_cal.apply(raw))
    assert not np.allclose(naive, at_site)  # without re-expressing, the site would run at another point
