"""Exceptions that name what is wrong with a model or an input."""


class BsbertError(ValueError):
    """Base class: every bsbert error is a ValueError with a message that names the problem."""


class UnsupportedModelError(BsbertError):
    """The model is not a BERT-like encoder bsbert knows how to patch."""


class AlreadyPatchedError(BsbertError):
    """patch() was called on a model that bsbert already patched."""


class NotPatchedError(BsbertError):
    """unpatch() was called on a model that bsbert did not patch."""
