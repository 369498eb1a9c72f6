"""`fedpir validate SITE_DIR`: check a site's data and list every subject that will be skipped.

Prints one line per bad subject (``sub-003: t2: NaN/Inf voxels in .../t2.nii.gz``; a file outside the
site folder and the ``--data-root`` folders is one of them), a ``warning:`` line per exact duplicate
scan (on stderr), then a summary, or with ``--json`` one JSON object (ValidationReport.to_dict, or
``{"error": ...}``).
Exit status: 0 if at least one subject is usable, 1 if none is, 2 if the site itself cannot be read
(no manifest or known layout, malformed manifest).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedpir.data.manifest import ManifestError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `fedpir validate`."""
    parser.add_argument("site", metavar="SITE_DIR", help="site folder, or its manifest.json/.csv")
    parser.add_argument("--json", action="store_true", help="print a machine-readable JSON report")
    parser.add_argument("--data-root", type=Path, action="append", default=[],
                        help="a folder outside the site folder that the manifest may point into (repeatable; "
                             "the node config's data-roots)")


def run(args: argparse.Namespace) -> int:
    """Validate the site and print the report; return the exit status described above."""
    from fedpir.data.validation import validate_site

    try:
        report = validate_site(args.site, args.data_root)
    except ManifestError as err:
        if args.json:
            print(json.dumps({"error": str(err)}))
        else:
            print(f"fedpir validate: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        for issue in report.bad:
            print(issue)
        for duplicate in report.duplicates:
            print(f"warning: {duplicate}", file=sys.stderr)
        print(report.summary())
    return 0 if report.good else 1
