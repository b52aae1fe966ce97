"""wadi_core: the library behind the notebooks of the WaDi companion (Weight Direction-aware Distillation).

Each numbered notebook calls one or two modules of this package; see README.md for the map.
"""

__version__ = "0.1.0"
