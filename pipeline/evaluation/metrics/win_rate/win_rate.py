"""Win rate of a model against a baseline, judged by scores (e.g. a reward model's); ties count half."""

import datasets
import evaluate

_DESCRIPTION = "(wins + 0.5 * ties) / n, where a win is a score above the baseline's score for the same prompt."
_KWARGS = """
Args:
    scores (list of float): the model's answers' scores.
    baseline_scores (list of float): the baseline's answers' scores, same prompts, same order.
Returns:
    win_rate (float), wins (int), ties (int), losses (int).
Example:
    >>> metric.compute(scores=[1, 1, 0, 3], baseline_scores=[0, 1, 1, 2])
    {'win_rate': 0.625, 'wins': 2, 'ties': 1, 'losses': 1}
"""


class WinRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"scores": datasets.Value("float64"),
                                        "baseline_scores": datasets.Value("float64")}))

    def _compute(self, scores, baseline_scores):
        n = len(scores)
        if n == 0:
            raise ValueError("win_rate: scores is empty; pass at least one pair of scores")
        wins = sum(s > b for s, b in zip(scores, baseline_scores))
        ties = sum(s == b for s, b in zip(scores, baseline_scores))
        return {"win_rate": (wins + 0.5 * ties) / n, "wins": wins, "ties": ties, "losses": n - wins - ties}
