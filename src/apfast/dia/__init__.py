"""DIA: detection and measurement of sources on difference images, association into DiaObjects, the
Alert Production Database (Rubin's schema, SQLite or PostgreSQL), forced photometry and Avro alerts.

May import: the core, :mod:`apfast.kernels`, :mod:`apfast.ccd` and :mod:`apfast.diffim`; the DIA stage
driver (``diapipe``) reads and writes its products through :mod:`apfast.repo`. Never :mod:`apfast.run`
or :mod:`apfast.sim`.
"""
