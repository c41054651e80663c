"""`python -m semid_cli ...` is the same as the `semid` command."""

import sys

from semid_cli import main

sys.exit(main())
