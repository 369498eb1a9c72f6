"""The synthetic hospital generator: MR phantoms, per-site scanners, NIfTI federations on disk.

Data only: nothing here trains or federates. Used by the simulation runner, the tests and the CLI.
"""
