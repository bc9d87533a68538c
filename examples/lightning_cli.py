"""Influence from a config file: LightningCLI with the demo's model and data.

From the repository root::

    python examples/lightning_cli.py fit --config callbacks/ekfac-queries.yaml

trains the tiny GPT-2 on the planted-fact corpus; the InfluenceCallback from the config
fits EK-FAC factors when training ends and scores examples/queries.jsonl (scores and
report.html in ./influence). No Python changes: callbacks/*.yaml add the callback to
``trainer.callbacks``; any option can be set on the command line (``--data.num_sequences 200
--trainer.max_epochs 1`` for a smoke test). See ``--help`` and ``fit --print_config``.

The Trainer defaults below (6 epochs) are the demo's: enough for the tiny model to learn
most facts, not so many that influence spreads over look-alike sentences.
"""

from lightning.pytorch.cli import LightningCLI

from lightning_influence.demo.driver import FactsDataModule, TinyGPT2LM


def main(args=None) -> LightningCLI:
    return LightningCLI(TinyGPT2LM, FactsDataModule, args=args,
                        trainer_defaults={"max_epochs": 6, "log_every_n_steps": 10})


if __name__ == "__main__":
    main()
