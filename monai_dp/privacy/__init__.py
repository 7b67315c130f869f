from ._stub import *  # TEMP
