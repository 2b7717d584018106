"""The parent side: ``TaskPool`` (Celery's pool hooks), the supervisor that knows which job
runs in which child, and the driver that serves the pipes where the worker has no hub."""
