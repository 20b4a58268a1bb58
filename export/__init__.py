"""``g2g-export``: the command-line layer over ``g2gserve.export``."""
