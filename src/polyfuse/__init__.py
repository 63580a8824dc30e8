"""polyfuse: knowledge fusion of large language models (FuseLLM, FuseChat, FuseChat-3.0/WRPO)."""

__version__ = "0.1.0"
