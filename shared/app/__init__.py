"""The use cases: one module each, over the ports (`shared.app.ports`); no I/O of their own."""
