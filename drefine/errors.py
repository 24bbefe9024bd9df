"""User-facing errors: one clear message, no traceback, non-zero exit (the CLI catches these)."""


class DrefineError(Exception):
    """A problem with the user's input or request, reported as one line by the CLI."""


class InputError(DrefineError):
    """A file that is missing, unreadable or not what it claims to be."""


class UnknownResidueError(DrefineError):
    """Residues with no restraint dictionary."""
