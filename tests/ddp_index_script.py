"""Run by test_index_wiring.py: InfluenceCallback(index=...) under strategy="ddp" on 2 CPU processes (gloo).

Usage: python tests/ddp_index_script.py OUT_DIR

Each rank writes the index shards of its own examples inside the eigenvalue-correction pass.
"""

import os
import sys

import lightning as L
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning_influence import ClassificationTask, InfluenceCallback  # noqa: E402
from tests import lit_models as lm  # noqa: E402


def main(out: str) -> None:
    torch.manual_seed(0)
    model = lm.LitClassifier()
    cb = InfluenceCallback(task=ClassificationTask(), strategy="ekfac", fisher="empirical",
                           output_dir=os.path.join(out, "factors"), index=os.path.join(out, "index"),
                           index_projection_dim=3, index_shard_size=8)
    trainer = L.Trainer(max_epochs=0, accelerator="cpu", devices=2, strategy="ddp", logger=False, callbacks=[cb],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_dataloaders=lm.loader(lm.classification_data(45), batch_size=8, shuffle=True))
    assert cb.builds_index_in_pass() and cb.index_path is not None


if __name__ == "__main__":
    main(sys.argv[1])
