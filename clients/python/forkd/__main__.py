"""``python3 -m forkd``: the forkctl command line."""
import sys

from .cli import main

sys.exit(main())
