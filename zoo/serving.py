"""Where models logged by earlier zoo versions find their pyfunc class (their logged code
imports it from here): see ``zoo.tracking.serving``."""

from zoo.tracking.serving import ZooPyfuncModel

__all__ = ["ZooPyfuncModel"]
