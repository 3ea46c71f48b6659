"""Data: text sources, token shards, and SQuAD-style question answering examples."""
