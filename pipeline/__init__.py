"""Train and align GPT-style language models on the Hugging Face stack.

Importing the package registers the PipelineGPT model family with transformers' Auto classes.
"""

from . import modeling  # noqa: F401  (registers PipelineGPT with the Auto classes)

__version__ = "0.1.0"
