"""ipspath: slide-level classifiers on whole-slide images with Iterative Patch Selection."""

__version__ = "0.1.0"
