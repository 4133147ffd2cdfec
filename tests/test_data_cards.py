"""Dataset cards: every card parses with Hub metadata, and the demo cards match what the generator measures now."""

import re
import shlex

import pytest
from huggingface_hub import DatasetCard

from conftest import REPO
from pipeline.cli import main

CARDS = sorted((REPO / "data_cards").glob("*.md"))
SCRIPT = (REPO / "data_cards" / "regenerate.sh").read_text()


def card_commands(prefix: str) -> list[list[str]]:
    demo = re.search(r'^DEMO="(.*)"$', SCRIPT, flags=re.M).group(1)
    lines = [line.strip() for line in SCRIPT.splitlines() if line.strip().startswith(prefix)]
    return [shlex.split(line.replace("$DEMO", demo))[1:] for line in lines]


@pytest.mark.parametrize("path", CARDS, ids=[p.name for p in CARDS])
def test_card_metadata_is_complete(path):
    card = DatasetCard.load(path)
    data = card.data.to_dict()
    for key in ("license", "language", "task_categories", "size_categories", "source_datasets"):
        assert data.get(key), f"{path.name}: metadata lacks {key}"
    for section in ("## Schema", "## Statistics", "## Cleaning applied", "## Known issues"):
        assert section in card.text, f"{path.name}: no {section} section"


@pytest.mark.parametrize("args", card_commands('card "demo:'), ids=lambda a: a[0])
def test_demo_cards_are_up_to_date(args, tmp_path):
    out_index = args.index("--out") + 1
    committed = REPO / args[out_index]
    args[out_index] = str(tmp_path / "card.md")
    assert main(["data", "card", *args]) == 0
    assert (tmp_path / "card.md").read_text() == committed.read_text(), \
        f"{committed.name} is stale: run `bash data_cards/regenerate.sh`"


def test_every_card_is_written_by_the_script():
    written = {a[a.index("--out") + 1] for a in card_commands("card ")}
    assert written == {f"data_cards/{p.name}" for p in CARDS}
