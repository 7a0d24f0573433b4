"""Curation: a platform log -> triplet shards, its data card, NSFW hooks."""
