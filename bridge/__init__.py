"""sdbridge's outside world: parameters, state, shared memory, OSC, the render loop and the CLI.

Nothing here knows what a UNet is; the model side lives in the `engines` package.
"""

__version__ = "0.1.0"
