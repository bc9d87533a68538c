"""Scoring: the engine, preconditioned queries and their store, streaming top-k and score shards, TF-IDF candidates."""
