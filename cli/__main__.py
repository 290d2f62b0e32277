"""`python -m panfoma.cli`: the `panfoma` console script run as a module (same start-up, same exit statuses)."""

import sys

from panfoma.cli.main import main

sys.exit(main())
