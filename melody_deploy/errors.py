"""Errors that stop a deploy before any host is changed."""

from pyinfra.api.exceptions import DeployError


class PreflightError(DeployError):
    """Invalid inventory data or host facts, found before any change.

    pyinfra prints the message of a DeployError without a traceback, so each
    line of the message names the host, the setting, the value and the fix.
    """

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(
            f"preflight found {len(problems)} problem(s); no host was changed:\n{lines}"
        )
