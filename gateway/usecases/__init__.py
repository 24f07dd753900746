"""The gateway's use cases: submit (run allowed, hold, approve by rule), read and wait, run
approved commands. They know the driver interface (:mod:`.driver`), never an edge or a driver."""
