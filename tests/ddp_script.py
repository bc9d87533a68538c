"""Run by test_ddp.py: fit factors and score with strategy="ddp" on 2 CPU processes (gloo).

Usage: python tests/ddp_script.py OUT_DIR
"""

import os
import sys

import lightning as L
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning_influence import ClassificationTask, InfluenceCallback, InfluenceModule  # noqa: E402
from tests import lit_models as lm  # noqa: E402


def main(out: str) -> None:
    torch.manual_seed(0)
    model = lm.LitClassifier()
    torch.save(model.state_dict(), os.path.join(out, "weights.pt")) if os.environ.get("LOCAL_RANK", "0") == "0" else None
    cb = InfluenceCallback(task=ClassificationTask(), strategy="ekfac", fisher="empirical",
                           output_dir=os.path.join(out, "factors"))
    trainer = L.Trainer(max_epochs=0, accelerator="cpu", devices=2, strategy="ddp", logger=False, callbacks=[cb],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    data = lm.classification_data(45)
    trainer.fit(model, train_dataloaders=lm.loader(data, batch_size=8, shuffle=True))
    module = InfluenceModule(model, task=ClassificationTask(), factors=cb.factors)
    queries = lm.loader(lm.classification_data(5, seed=7), batch_size=2)
    through = module.pairwise_scores(queries, lm.loader(data, batch_size=8), trainer=trainer)
    in_process = module.pairwise_scores(queries, lm.loader(data, batch_size=8))  # shards by itself
    self_scores = module.self_scores(lm.loader(data, batch_size=8), trainer=trainer)
    top = module.top_k(queries, lm.loader(data, batch_size=8), k=4)  # per-rank top-k merged across ranks
    rank = trainer.global_rank
    save_file({"through": through.contiguous(), "in_process": in_process.contiguous(),
               "self": self_scores.contiguous(), "top_pos": top["positive"][1].contiguous(),
               "top_neg": top["negative"][1].contiguous()}, os.path.join(out, f"scores-rank{rank}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
