"""The online plane: ingest worker, faust agents, state, scoring, alert policy, archiver."""
