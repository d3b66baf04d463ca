"""fedfreeze: site-level and federated progressive-freezing fine-tuning of imaging CNNs."""

from importlib.metadata import PackageNotFoundError, version

try:  # one source of the version: pyproject.toml, as the installed package's metadata holds it
    __version__ = version("fedfreeze")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
