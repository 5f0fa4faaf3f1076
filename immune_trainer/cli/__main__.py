"""``python -m immune_trainer.cli``: the ``immune-trainer`` command."""

import sys

from . import main

sys.exit(main())
