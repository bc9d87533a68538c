"""A small byte-level BPE tokenizer trained locally on the demo corpus (no hub access).

The demo's special-token convention lives here, in the tokenizer's post-processor, and
nowhere else: encoding a text for training gives ``BOS + text + EOS`` (both
``<|endoftext|>``, as in GPT-2's documents), so the first real token is predicted from a
fixed context and a document ends with EOS. The library's datasets
(:mod:`lightning_influence.text`) use whatever special tokens a tokenizer adds: training
texts get both, queries get the leading BOS only (their completion is measured as a
continuation inside a document).

Byte-level BPE (GPT-2 style) is used because it round-trips text exactly: spaces are
part of the tokens (" clockmaker"), so ``decode(encode(text)) == text`` and per-token
strings read naturally in influence reports. Its pre-tokenizer splits on whitespace and
punctuation before merging, like GPT-2's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "UNK_TOKEN",
    "train_tokenizer",
    "load_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"  # also used as BOS, as in GPT-2
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
_SPECIALS = [EOS_TOKEN, PAD_TOKEN, UNK_TOKEN]


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 2048,
    save_dir: str | Path | None = None,
    *,
    min_frequency: int = 2,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``.

    Args:
        texts: training texts (e.g. ``corpus.texts``).
        vocab_size: upper bound on the vocabulary, special tokens and the 256 byte
            symbols included; the corpus may support fewer merges.
        save_dir: if given, the tokenizer is written there with ``save_pretrained`` and
            can be reloaded with :func:`load_tokenizer`.
        min_frequency: a pair must occur this often to be merged.
        model_max_length: the context length of the model it is for (kept with the
            tokenizer: query datasets refuse longer queries); ``None``: unknown.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``eos_token == bos_token == "<|endoftext|>"``
        (id 0), ``pad_token == "<pad>"`` (id 1), ``unk_token == "<unk>"`` (id 2). With
        ``add_special_tokens=True`` (the default of ``encode``) it adds BOS before and EOS
        after the text; with ``add_special_tokens=False`` nothing.

    Training is deterministic for a given list of texts.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer needs at least one text")
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=_SPECIALS,
        # All 256 bytes, so any text (even unseen characters) can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    eos_id = tok.token_to_id(EOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOS_TOKEN} $A {EOS_TOKEN}", pair=f"{EOS_TOKEN} $A {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(EOS_TOKEN, eos_id)],
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="right",
        **({} if model_max_length is None else {"model_max_length": model_max_length}),
    )
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(str(save_dir))
    return hf


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer written by :func:`train_tokenizer` (local files only)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}; train one with train_tokenizer")
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
