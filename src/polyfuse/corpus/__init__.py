"""Documents and corpora: the on-disk JSONL layout shared by every stage."""
