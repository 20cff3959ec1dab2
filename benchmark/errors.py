"""Errors that are the user's to fix: the CLI prints them without a traceback and exits with 2."""


class UserError(Exception):
    """A mistake in the user's input (a name, a file, a flag); the message says what and how to fix it."""


class UnknownName(UserError):
    """A dataset/arch/regime/grid name that is not registered."""

    def __init__(self, kind: str, name: str, valid):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"unknown {kind} '{name}'. Valid {kind}s: {', '.join(self.valid)}")


class DataUnavailable(UserError):
    """Dataset files are missing from the data root and downloading was not asked for."""


class RunFailed(Exception):
    """A single run failed for a reason worth recording in its error.json (the grid goes on)."""


class NonFiniteLoss(RunFailed):
    def __init__(self, epoch: int, phase: str):
        super().__init__(f"non-finite loss at epoch {epoch}, phase {phase}")
        self.epoch, self.phase = epoch, phase
