"""SQuAD v1.1 EM/F1 against hand-worked examples (the official evaluate-v1.1.py rules)."""

from __future__ import annotations

import pytest

from lmforge.data.sources import QAExample
from lmforge.evaluate import exact_match_score, f1_score, normalize_answer, squad_scores


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The  Eiffel Tower!", "eiffel tower"),  # case, article, punctuation, whitespace
        ("an apple, a day", "apple day"),
        ("Theatre of the Absurd", "theatre of absurd"),  # 'the' only as a whole word
        ("U.S. $1,000", "us 1000"),  # punctuation is deleted, not replaced by a space
        ("state-of-the-art", "stateoftheart"),
        ("  \tA\n", ""),
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_ignores_case_articles_and_punctuation():
    assert exact_match_score("the Eiffel tower.", "Eiffel Tower") == 1.0
    assert exact_match_score("Eiffel", "Eiffel Tower") == 0.0


def test_f1_hand_worked():
    # pred {eiffel, tower, in, paris}, gold {eiffel, tower}: P = 2/4, R = 2/2, F1 = 2PR/(P+R) = 2/3
    assert f1_score("Eiffel tower in Paris", "the Eiffel Tower") == pytest.approx(2 / 3)
    # repeated tokens count once per occurrence in both: common = min counts = 2 of 4 predicted
    assert f1_score("new york new york", "New York") == pytest.approx(2 / 3)
    # P = 1/1, R = 1/3 -> 2 * (1/3) / (4/3) = 0.5
    assert f1_score("1976", "in 1976 AD") == pytest.approx(0.5)
    assert f1_score("Denver", "Carolina Panthers") == 0.0
    # the official script gives 0 when nothing is shared, even if both normalise to empty
    assert f1_score("", "the") == 0.0
    assert exact_match_score("", "the") == 1.0


def _ex(qid: str, answers: list[str]) -> QAExample:
    return QAExample(id=qid, question="q?", context="c", answers=answers, answer_starts=[0] * len(answers))


def test_multiple_gold_answers_take_the_maximum():
    ex = _ex("a", ["Denver Broncos", "Broncos", "the Broncos"])
    scores = squad_scores({"a": "Broncos"}, [ex])
    assert scores == {"em": 100.0, "f1": 100.0, "n": 1}
    # "Denver" vs "Denver Broncos": P = 1, R = 1/2 -> F1 2/3; the other golds give 0
    scores = squad_scores({"a": "Denver"}, [ex])
    assert scores["em"] == 0.0
    assert scores["f1"] == pytest.approx(100 * 2 / 3)


def test_micro_average_over_questions_with_missing_predictions():
    examples = [_ex("1", ["Paris"]), _ex("2", ["New York City"]), _ex("3", ["1990"]), _ex("4", ["red"])]
    predictions = {
        "1": "paris.",  # EM 1, F1 1
        "2": "York City",  # P 1, R 2/3 -> F1 0.8
        "3": "1991",  # 0
        # "4" missing: scores 0, still counted
    }
    scores = squad_scores(predictions, examples)
    assert scores["n"] == 4
    assert scores["em"] == pytest.approx(100 * 1 / 4)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.8 + 0 + 0) / 4)


def test_a_missing_prediction_scores_zero_even_against_a_gold_answer_that_normalizes_to_nothing():
    # the official script: an unanswered question scores 0; an empty answer is compared like any other
    examples = [_ex("dot", ["."])]
    assert squad_scores({}, examples)["em"] == 0.0
    assert squad_scores({"dot": ""}, examples)["em"] == 100.0
