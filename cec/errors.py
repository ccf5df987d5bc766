"""Exception types of the library. CLIs turn each into one line on stderr and a non-zero exit."""


class CECError(Exception):
    """Base of every error the library raises for bad input; its message is one line meant for the user."""


class ConfigError(CECError):
    """A model config that is missing, malformed, unsupported, or does not match the weights."""


class WeightsError(CECError):
    """Weights that are missing, truncated, corrupt, of an unsafe format, or of the wrong shape."""


class TokenizerError(CECError):
    """A tokenizer file that is missing or unreadable."""


class DataError(CECError):
    """A notes file, concept set or code list that is missing or malformed (names the file and line)."""


class AdapterError(CECError):
    """LoRA adapters that are missing, corrupt, or made for another base model or concept set."""


def json_error_text(e, unit: str = "line") -> str:
    """A JSONDecodeError as "msg at line N" ("Unterminated string starting at line N", not "... at at ...")."""
    where = f"{unit} {e.lineno if unit == 'line' else e.colno}"
    return f"{e.msg} {where}" if e.msg.endswith(" at") else f"{e.msg} at {where}"
