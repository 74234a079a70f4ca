"""The I/O shell: the engine loop, workers, the supervisor and the server."""
