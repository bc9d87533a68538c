"""The Lightning glue: the callback, the LightningModule that scores, and the end-of-run pipeline."""
