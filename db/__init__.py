"""State: the database models, sessions, settings, storage and the job state machine."""
