"""`python -m semid.cli ...` is the same as the `semid` command."""

import sys

from semid.cli import main

sys.exit(main())
