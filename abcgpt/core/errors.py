"""The one base of every error a user can fix. The tools catch UserError alone and print its message
in one line; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """Something the user can fix: a flag, a file, a setting, a request."""


class SettingsError(UserError, ValueError):
    """A setting or flag outside its allowed values."""
