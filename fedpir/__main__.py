"""``python -m fedpir``: the ``fedpir`` command."""

import sys

from fedpir.commands import main

sys.exit(main())
