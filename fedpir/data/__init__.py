"""NIfTI site datasets, manifests, validation, transforms."""
