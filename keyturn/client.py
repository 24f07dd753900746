"""The agent client's public import path: ``from keyturn.client import Client``.

The code lives in :mod:`keyturn.agent.client`, inside the agent SDK's package (which an import
contract keeps free of every server module); its ``__all__`` is what this path offers. This is
the name agent code and the docs use, so it stays stable however the package is arranged.
"""

from keyturn.agent.client import *  # noqa: F403
from keyturn.agent.client import __all__ as __all__
