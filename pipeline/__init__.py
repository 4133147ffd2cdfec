"""Train and align GPT-style language models on the Hugging Face stack.

Importing the package registers the PipelineGPT model family with transformers' Auto classes, and drops one known
start-up warning of a third-party library (below) before anything of ours imports that library.
"""

import logging


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message starts with `prefix`; every other record passes."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# bitsandbytes 0.50 warns at import, on CPUs with AVX512-BF16, that the optional `kernels` package is missing, then
# uses its built-in CPU kernel, which works. transformers (TrainingArguments), peft and trl import bitsandbytes, and
# every entry point imports this package before them, so this is the one place to drop that one message.
BITSANDBYTES_KERNELS_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessage(BITSANDBYTES_KERNELS_WARNING))

from . import modeling  # noqa: E402, F401  (registers PipelineGPT with the Auto classes)

__version__ = "0.1.0"
