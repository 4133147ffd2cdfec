"""Perplexity from per-example summed token negative log-likelihoods and token counts.

Running the model is the caller's job (see `pipeline.evaluation.evaluators.perplexity`); this module only pools
the sums, so a corpus is weighted by tokens, not by examples.
"""

import math

import datasets
import evaluate

_DESCRIPTION = "exp(total NLL / total tokens) over a corpus; pass each example's summed NLL and its token count."
_KWARGS = """
Args:
    nll_sum (list of float): summed negative log-likelihood (nats) of each example's predicted tokens.
    token_count (list of int): number of predicted tokens of each example.
Returns:
    perplexity (float), mean_nll (float, nats per token).
Example:
    >>> metric.compute(nll_sum=[2.0, 4.0], token_count=[2, 2])
    {'perplexity': 4.4816..., 'mean_nll': 1.5}
"""


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"nll_sum": datasets.Value("float64"), "token_count": datasets.Value("int64")}))

    def _compute(self, nll_sum, token_count):
        if any(n < 0 for n in token_count):
            raise ValueError("perplexity: token_count has a negative entry; pass the number of scored tokens")
        tokens = sum(token_count)
        if tokens == 0:
            raise ValueError("perplexity: token_count sums to 0; there are no tokens to score")
        mean = sum(nll_sum) / tokens
        try:
            value = math.exp(mean)
        except OverflowError:  # an untrained or diverged model; report it rather than crash the evaluation
            value = math.inf
        return {"perplexity": value, "mean_nll": mean}
