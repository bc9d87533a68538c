"""Built-in demo data: a synthetic corpus with planted facts, a local tokenizer, and
language-model datasets/collators for training and for influence queries."""

from .corpus import FACT_TYPES, Corpus, generate_corpus, make_queries, supporting_indices
from .lm import (
    IGNORE_INDEX,
    LMCollator,
    LMDataset,
    QueryCollator,
    QueryDataset,
    QueryFileError,
    collate_lm,
    collate_queries,
    decode,
    encode_query,
    encode_text,
    read_jsonl_queries,
    texts,
    token_strings,
    write_jsonl_queries,
)
from .tokenizer import EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, load_tokenizer, train_tokenizer

__all__ = [
    "FACT_TYPES",
    "Corpus",
    "generate_corpus",
    "make_queries",
    "supporting_indices",
    "IGNORE_INDEX",
    "LMCollator",
    "LMDataset",
    "QueryCollator",
    "QueryDataset",
    "QueryFileError",
    "collate_lm",
    "collate_queries",
    "decode",
    "encode_query",
    "encode_text",
    "read_jsonl_queries",
    "texts",
    "token_strings",
    "write_jsonl_queries",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "UNK_TOKEN",
    "load_tokenizer",
    "train_tokenizer",
]
