"""`python -m moecc` is the `moecc` command."""

import sys

from moecc.cli import main

sys.exit(main())
