"""fedpir: federated personalized invariant representation learning for 3D medical imaging."""

from importlib.metadata import version

# The version is declared once, in pyproject.toml (Flower's `flwr build` needs it there, statically).
__version__ = version("fedpir")
