"""Pairwise reward accuracy: how often the chosen answer scores above the rejected one, and the mean margin."""

import datasets
import evaluate

_DESCRIPTION = "Share of preference pairs whose chosen score exceeds the rejected score; mean(chosen - rejected)."
_KWARGS = """
Args:
    chosen_scores (list of float), rejected_scores (list of float): reward-model scores of each pair.
Returns:
    accuracy (float): ties count as wrong; margin (float): mean(chosen - rejected).
Example:
    >>> metric.compute(chosen_scores=[1.0, 0.5], rejected_scores=[0.0, 1.0])
    {'accuracy': 0.5, 'margin': 0.25}
"""


class RewardAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"chosen_scores": datasets.Value("float64"),
                                        "rejected_scores": datasets.Value("float64")}))

    def _compute(self, chosen_scores, rejected_scores):
        n = len(chosen_scores)
        if n == 0:
            raise ValueError("reward_accuracy: chosen_scores is empty; pass at least one scored pair")
        # A tie is not a win: a reward model that scores everything equally has learned nothing.
        wins = sum(c > r for c, r in zip(chosen_scores, rejected_scores))
        return {"accuracy": wins / n, "margin": sum(c - r for c, r in zip(chosen_scores, rejected_scores)) / n}
