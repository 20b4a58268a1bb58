"""Data sets, preprocessing and image decoding."""
