"""Implicit fusion (FuseChat-3.0 / WRPO): sample from many sources, score, build SFT / preference data, train."""
