"""Helpers shared by every layer of the package (private to ``brainage_core``).

They sit below all their users: input validation and its error type, atomic file
output, padding of volumes, small torch helpers, and the shared parameter docs."""
