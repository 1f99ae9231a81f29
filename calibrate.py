"""python calibrate.py: the door onto abcgpt.tools.calibrate (--help says what it does)."""
from abcgpt.tools.calibrate import command, main

__all__ = ["main"]  # main(argv): the tool itself, for the tests and notebooks

if __name__ == "__main__":
    command()
