"""The one exception type users see.

Anything raised as `LlmqError` is a problem with the user's input or environment (missing file, unsupported
architecture, malformed header, ...). The CLI prints its message on one line and exits with code 2; any other
exception is a bug in llmq.
"""


class LlmqError(Exception):
    """A user-facing error: the message is one line that says what is wrong and, where possible, what to do."""

    exit_code = 2
