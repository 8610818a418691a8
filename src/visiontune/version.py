"""The package's version, in a module of the bottom layer so that commands reporting it (``visiontune doctor``)
need not import the root package and everything it re-exports."""

__version__ = "0.1.0"
