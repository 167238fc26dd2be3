"""``python -m sd_server``: the same as ``sd-serve``."""

import sys

from sd_server.cli import main

sys.exit(main())
