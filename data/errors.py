"""The one exception type users see as a one-line message (no traceback unless --debug)."""


class UserError(Exception):
    """Bad input or state the user can fix; the message says what is wrong and what to do."""
