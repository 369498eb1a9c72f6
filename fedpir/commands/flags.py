"""Command-line flags shared by several commands, derived from the run settings where they set one."""

from __future__ import annotations

import argparse


def add_noise_flag(parser: argparse.ArgumentParser) -> None:
    """The one flag that makes DP noise replayable (for `fedpir train` and `fedpir simulate`)."""
    parser.add_argument("--reproducible-noise", action="store_true",
                        help="seed DP noise and sampling from --seed so that a run repeats (experiments only: "
                             "whoever knows the seed can replay the noise); default: from OS entropy")
