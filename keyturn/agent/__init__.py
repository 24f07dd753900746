"""The agent SDK: what an agent host installs (``pip install keyturn``), and nothing more.

The API's wire models (:mod:`.api`), the client (:mod:`.client`, public as
:mod:`keyturn.client`), the text a model reads (:mod:`.reports`), CrewAI tools (:mod:`.crewai`,
extra ``crewai``) and the MCP server (:mod:`.mcp`, extra ``mcp``). An import contract keeps
this package free of every server module and server dependency, and a test installs the wheel
without extras and imports the client.
"""
