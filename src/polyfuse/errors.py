"""User-facing errors: one readable line that names the file, key or path and the fix."""


class PolyfuseError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits with code 2."""


class RecipeError(PolyfuseError):
    """A recipe (YAML plus overrides) that does not validate."""


class ModelLoadError(PolyfuseError):
    """A model or tokenizer reference that cannot be resolved or loaded."""


class DataError(PolyfuseError):
    """Input data (corpus, JSONL rows) that is missing or malformed."""
