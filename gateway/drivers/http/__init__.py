"""The ``http`` driver: HTTP API targets (:mod:`.driver`), their credentials
(:mod:`.credential`) and the answers agents see (:mod:`.response`)."""
