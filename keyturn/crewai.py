"""The CrewAI tools' public import path: ``from keyturn.crewai import KeyturnSQLTool``.

The code lives in :mod:`keyturn.agent.crewai` (``pip install 'keyturn[crewai]'``); this name is
what crews and the docs use, so it stays stable however the package is arranged.
"""

from keyturn.agent.crewai import KeyturnRequestStatusTool, KeyturnShellTool, KeyturnSQLTool

__all__ = ["KeyturnRequestStatusTool", "KeyturnSQLTool", "KeyturnShellTool"]
