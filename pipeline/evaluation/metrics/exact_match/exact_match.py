"""Exact match after whitespace normalisation: the share of predictions equal to their reference."""

import datasets
import evaluate

_DESCRIPTION = "Share of predictions equal to their reference after trimming and collapsing runs of whitespace."
_KWARGS = """
Args:
    predictions (list of str): model answers.
    references (list of str): reference answers, same order.
Returns:
    exact_match (float): in [0, 1].
Example:
    >>> metric.compute(predictions=["a  b", " c"], references=["a b", "d"])
    {'exact_match': 0.5}
"""


def normalise(text: str) -> str:
    # Generation often ends in a newline or doubles a space; neither makes an answer wrong.
    return " ".join(text.split())


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("exact_match: predictions is empty; pass at least one prediction and reference")
        hits = sum(normalise(p) == normalise(r) for p, r in zip(predictions, references))
        return {"exact_match": hits / len(predictions)}
