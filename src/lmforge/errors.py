"""The one exception type users see: a single line naming what is wrong and where."""


class LmforgeError(Exception):
    """An expected mistake (bad input, bad config, missing file). The CLI prints it as one line."""


class ConfigError(LmforgeError):
    """A recipe or override that does not fit the typed config; `key` names the setting when one is at fault."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key
