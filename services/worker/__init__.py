"""The background worker: the projector (and, with the chat issue, the arq chat jobs)."""
