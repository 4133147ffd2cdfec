"""Data layer: sources, formats, validation, cleaning, packing, tokenizer training."""
