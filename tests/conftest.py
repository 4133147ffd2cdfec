import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# The README and shipped configs name Hub datasets; offline, tests read local slices of the same data instead.
HUB_STANDINS = {"tatsu-lab/alpaca": SHARED_DATA / "sft" / "alpaca_en_0-3252.json",
                "Anthropic/hh-rlhf": SHARED_DATA / "preference" / "hh_rlhf_harmless_base_test_0-1800.jsonl"}


def with_local_standins(text: str) -> str:
    """`text` with every Hub dataset id of HUB_STANDINS replaced by the path of its local slice."""
    for hub_id, local in HUB_STANDINS.items():
        text = text.replace(hub_id, str(local))
    return text


def names_hub_data(text: str) -> bool:
    return any(hub_id in text for hub_id in HUB_STANDINS)


@pytest.fixture
def shared_data() -> Path:
    """The real public data slices beside the checkout; tests that need them skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (needs ../shared/data beside the checkout)")
    return SHARED_DATA
