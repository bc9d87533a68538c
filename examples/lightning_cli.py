"""Influence from a config file: LightningCLI with the demo's model and data.

From the repository root::

    python examples/lightning_cli.py fit --config callbacks/ekfac-queries.yaml \
        --data.num_sequences 2000 --trainer.max_epochs 8

trains the tiny GPT-2 on the planted-fact corpus; the InfluenceCallback from the config
fits EK-FAC factors when training ends and scores examples/queries.jsonl (scores and
report.html in ./influence). No Python changes: callbacks/*.yaml add the callback to
``trainer.callbacks``. See ``--help`` and ``fit --print_config`` for every option.
"""

from lightning.pytorch.cli import LightningCLI

from lightning_influence.demo import FactsDataModule, TinyGPT2LM


def main(args=None) -> LightningCLI:
    return LightningCLI(TinyGPT2LM, FactsDataModule, args=args)


if __name__ == "__main__":
    main()
