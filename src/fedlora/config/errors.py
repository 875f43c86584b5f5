"""`ConfigError`, the one exception the config package raises."""


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and how to fix it."""
