"""``python -m vbatch.jobs.cli``: the ``vbatch`` command."""

import sys

from vbatch.jobs.cli import main

sys.exit(main())
