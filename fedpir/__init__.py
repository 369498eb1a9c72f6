"""fedpir: federated personalized invariant representation learning for 3D medical imaging."""

__version__ = "0.1.0"
