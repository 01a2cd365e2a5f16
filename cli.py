"""memwatch's command line in a clone: `python cli.py ARGS` is `memwatch ARGS` (memwatch/cli.py)."""

from memwatch.cli import main

if __name__ == "__main__":
    main()
