"""The error a command ends with when it cannot do its work."""

from __future__ import annotations


class CommandError(Exception):
    """A command that failed for a reason the requester should see.

    `code` is a stable snake_case token such as `pims_timeout` or
    `integration_paused`. `detail` is one sentence for a person that names the
    value at fault and what to do. Neither carries client data or secrets.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
