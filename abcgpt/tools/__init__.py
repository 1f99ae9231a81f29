"""The command-line tools, and what they share: the parser, runtime flags, the one catch of a user's mistake."""
