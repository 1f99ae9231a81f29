"""What the command-line tools share (the parser, runtime flags, the one catch of a user's mistake) and the tools that live in the library."""
