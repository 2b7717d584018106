"""The database side: engines per loop, ``session()``/``engine()``, the connection budget,
``celery asyncsql check`` and fork safety. It never imports the parent or the child."""
