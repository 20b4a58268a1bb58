"""Training command-line layer on top of g2gserve."""
