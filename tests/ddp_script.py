"""Run by test_ddp.py: fit factors and score with strategy="ddp" on 2 CPU processes (gloo).

Usage: python tests/ddp_script.py OUT_DIR

Rank zero's output_dir holds unfinished factors (test_ddp.py puts them there) and rank one's is
empty, as on nodes without a shared filesystem: both ranks must follow rank zero's resume. The
callback then scores its queries on both ranks together; the InfluenceModule scores through the
trainer (matrix, self-influence, top-k, shards); last, rank zero alone scores in-process.
"""

import json
import os
import sys

import lightning as L
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lightning_influence.integration.callback as cb_mod  # noqa: E402
from lightning_influence import ClassificationTask, InfluenceCallback, InfluenceModule  # noqa: E402
from lightning_influence.errors import ScoringError  # noqa: E402
from tests import lit_models as lm  # noqa: E402


def main(out: str) -> None:
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    phases = []
    real_run_phase = cb_mod.run_phase
    cb_mod.run_phase = lambda phase, *a, **k: (phases.append(phase), real_run_phase(phase, *a, **k))[1]
    torch.manual_seed(0)
    model = lm.LitClassifier()
    output_dir = os.path.join(out, "factors" if rank == 0 else f"factors-rank{rank}")
    cb = InfluenceCallback(task=ClassificationTask(), strategy="ekfac", fisher="empirical", output_dir=output_dir,
                           queries="tests.lit_models:query_loader", top_k=4)
    trainer = L.Trainer(max_epochs=0, accelerator="cpu", devices=2, strategy="ddp", logger=False, callbacks=[cb],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    data = lm.classification_data(45)
    trainer.fit(model, train_dataloaders=lm.loader(data, batch_size=8, shuffle=True))
    rank = trainer.global_rank
    with open(os.path.join(out, f"phases-rank{rank}.json"), "w") as f:
        json.dump(phases, f)
    module = InfluenceModule(model, task=ClassificationTask(), factors=cb.factors)
    queries = lm.loader(lm.classification_data(5, seed=7), batch_size=2)
    train = lm.loader(data, batch_size=8)
    through = module.pairwise_scores(queries, train, trainer=trainer)
    per_layer = module.pairwise_scores(queries, train, trainer=trainer, per_layer=True)
    self_scores = module.self_scores(train, trainer=trainer)
    top = module.top_k(queries, train, k=4, trainer=trainer)
    sharded = module.top_k(queries, train, k=4, trainer=trainer, shard_size=16,
                           scores_dir=os.path.join(out, "shards"))
    tensors = {"through": through, "per_layer": per_layer, "self": self_scores, "callback": cb.scores,
               "top_pos": top["positive"][1], "top_neg": top["negative"][1],
               "top_pos_values": top["positive"][0], "shard_pos": sharded["positive"][1],
               "shard_neg": sharded["negative"][1]}
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, f"scores-rank{rank}.safetensors"))
    try:  # the shards exist now: every rank refuses together (rank zero looked), none waits alone
        module.top_k(queries, train, k=4, trainer=trainer, scores_dir=os.path.join(out, "shards"))
        refused = "no"
    except ScoringError as err:
        refused = str(err)
    with open(os.path.join(out, f"refused-rank{rank}.txt"), "w") as f:
        f.write(refused)
    if trainer.is_global_zero:
        # The pattern of issue 13, item 1: the other rank is done (and gone); no collective may be entered.
        in_process = module.pairwise_scores(queries, train)
        alone = module.top_k(queries, train, k=4)
        save_file({"in_process": in_process.contiguous(), "top_pos": alone["positive"][1].contiguous()},
                  os.path.join(out, "rank0-alone.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
