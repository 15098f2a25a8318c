"""`python -m softlabels ...` is the `softlabels` command (what `accelerate launch -m` runs)."""

from softlabels.cli import run

if __name__ == "__main__":
    run()
