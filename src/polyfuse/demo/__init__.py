"""The embedded tiny world: real corpora, locally trained tokenizers and tiny source/target models."""
