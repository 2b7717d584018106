"""The child side: the process, its loop (``runtime``), the job server, the tracer greenlets,
the sync thread, the leftovers' clean-up and the watchdog. It never imports the parent."""
