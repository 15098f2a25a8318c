"""`python -m softlabels ...` is the `softlabels` command (what `accelerate launch -m` runs)."""

import sys

from softlabels.cli import main

if __name__ == "__main__":
    sys.exit(main())
