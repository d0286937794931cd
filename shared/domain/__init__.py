"""The session domain: wire types, commands, events, the pure fold and the projection.

Nothing here imports Redis, HTTP or any other I/O; the services call it with
state they loaded and persist what it returns.
"""
