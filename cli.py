"""memwatch's command line in a clone: `python cli.py ARGS` is `memwatch ARGS` (memwatch/__main__.py, memwatch/cli.py)."""

from memwatch.__main__ import run

if __name__ == "__main__":
    run()
