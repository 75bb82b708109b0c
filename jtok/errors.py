"""The base class of every error that reports a user mistake.

The CLI prints such errors as one line and exits with status 2. It lives in a module of
its own, free of heavy imports, so that `jtok --help` does not have to load torch.
"""


class JTokError(Exception):
    """A mistake in a config, data, checkpoint, spec or command-line argument."""
