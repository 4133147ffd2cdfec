"""One module per stage: builds data, model and trainer, and writes the artifact."""
