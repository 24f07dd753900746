"""The CrewAI tools' public import path: ``from keyturn.crewai import KeyturnSQLTool``.

The code lives in :mod:`keyturn.agent.crewai` (``pip install 'keyturn[crewai]'``); its
``__all__`` is what this path offers, under the name crews and the docs use.
"""

from keyturn.agent.crewai import *  # noqa: F403
from keyturn.agent.crewai import __all__ as __all__
