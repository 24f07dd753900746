"""One driver per kind of target (:class:`gateway.usecases.driver.Driver`), registered by the
bootstrap under the policy's ``kind``."""
