"""python evaluate.py: the door onto abcgpt.tools.evaluate (--help says what it does)."""
from abcgpt.tools.evaluate import command, main

__all__ = ["main"]  # main(argv): the tool itself, for the tests and notebooks

if __name__ == "__main__":
    command()
