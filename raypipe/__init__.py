"""raypipe: distributed batch classification of image-text pairs on Ray."""

__version__ = "0.1.0"
