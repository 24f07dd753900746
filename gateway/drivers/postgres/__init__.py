"""The ``postgres`` target driver: allowed reads on each agent's own read-only login, the
planner's estimate for a held command's card, approved commands on the bot's credentials."""
