"""``python -m sd_pipeline.training`` (and ``torchrun -m sd_pipeline.training``): sd-train."""

import sys

from sd_pipeline.training.cli import main

sys.exit(main())
