"""On-call engineers' own access: ask for it, receive it by DM, hear of every change, see it
on the App Home.

Access is a request like an agent's (same cards, quorum and self-approval ban, same issuing,
revoking and extending in :class:`bot.service.Bot`), so this package adds only what is a
person's: the checks of :class:`~keyturn.config.rules.AccessRule` (:mod:`.ask`), delivery by DM
(:mod:`.deliver`; the credentials go nowhere else), the news and reminders (:mod:`.news`),
and the lists and App Home (:mod:`.home`).
"""
