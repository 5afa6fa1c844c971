"""The directional check: a worse vital sign, in a whole round computed by the stream's feature code,
must never lower a model's risk."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from batch.directional import CALM, WORSENING, directional_table, directional_violations, model_scorer, round_features

# the model shipped until the coefficients were sign-constrained (wardwatch/models/v0001 then, sha256 5bf21c67...)
UNCONSTRAINED = Path(__file__).resolve().parents[1] / "fixtures" / "models" / "unconstrained"


def test_the_unconstrained_model_answers_a_worse_consciousness_level_with_a_lower_risk():
    """The defect: C 0.99, V 0.63, P 0.015, U 0.000 on an otherwise normal round, and SBP 80 below SBP 90."""
    table = directional_table(model_scorer(UNCONSTRAINED, "v0001"))
    levels = dict(table["consciousness"]["first round"])
    assert levels["U"] < 0.01 < levels["C"]
    violations = directional_violations(table)
    assert any(v.startswith("consciousness (first round): risk falls from") and "at C to" in v for v in violations)
    assert any(v.startswith("systolic_bp") for v in violations)


def test_a_risk_that_rises_at_every_step_passes_and_a_dip_names_its_parameter_and_step():
    def news2_like(rows):  # monotone in every parameter: NEWS2 itself as the score
        return np.array([r["news2"] / 20 for r in rows])
    assert directional_violations(directional_table(news2_like)) == []

    def dips_at_p(rows):
        return np.array([0.1 if r["consciousness_last_24h"] == 3 else r["news2"] / 20 for r in rows])
    violations = directional_violations(directional_table(dips_at_p))
    assert violations == ["consciousness (first round): risk falls from 0.150 at V to 0.100 at P",
                          "consciousness (after calm rounds): risk falls from 0.150 at V to 0.100 at P"]


def test_the_rounds_are_the_streams_features_of_one_worse_parameter():
    code, steps = WORSENING["consciousness"]
    first = [round_features(CALM | {code: v})["news2"] for _, v in steps]
    assert first == [0, 3, 3, 3, 3]
    after = round_features(CALM | {code: 4.0}, history=3)
    assert after["consciousness_max_24h"] == 4 and after["vitals_count_6h"] == 4
