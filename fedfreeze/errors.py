"""Typed errors: every message names the field, file or row and what was expected."""


class FedfreezeError(Exception):
    """Base class for errors a user can act on."""


class ConfigError(FedfreezeError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class DataError(FedfreezeError, ValueError):
    """Input data (manifest row, image file, array file) cannot be used as given."""


class CheckpointError(FedfreezeError, ValueError):
    """A weights file does not match the architecture it is loaded into."""


class ProtocolError(FedfreezeError, ValueError):
    """A message between coordinator and site does not follow the round contract (federation/protocol.py)."""


class OutputError(FedfreezeError, ValueError):
    """An output folder cannot be written as asked: it exists, another run holds it, it is an input."""


class MissingExtraError(FedfreezeError):
    """A setting needs optional packages this installation lacks; the message names the pip extra."""


class LaunchError(FedfreezeError):
    """A Flower process could not be started, or a run did not complete."""


class CoordinatorUnreachable(LaunchError):
    """The coordinator did not answer: it is down, restarting, or not reachable from here."""


def unreachable(address: str, detail: str) -> CoordinatorUnreachable:
    return CoordinatorUnreachable(
        f"the coordinator at {address} does not answer ({detail}): it is down, restarting, or not reachable "
        "from here (address, firewall, TLS); what became of the run is unknown until it answers"
    )
