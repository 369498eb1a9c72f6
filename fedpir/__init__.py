"""fedpir: federated personalized invariant representation learning for 3D medical imaging."""

from importlib.metadata import PackageNotFoundError, version

# The version is declared once, in pyproject.toml (Flower's `flwr build` needs it there, statically).
try:
    __version__ = version("fedpir")
except PackageNotFoundError:  # imported from a source tree or an app bundle that was never installed
    __version__ = "0+unknown"
