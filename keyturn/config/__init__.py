"""The configuration file, by part: :mod:`.policy` (the whole file's model), :mod:`.targets`,
:mod:`.rules` (agents' rules, people's access rules, masking, tests), :mod:`.process` (the
gateway's, the bot's, Vault's and Slack's settings), :mod:`.durations`, and :mod:`.loading`
(YAML, located errors, no secrets). A module imports the part it needs."""
