"""Redis adapters: the key layout, the Lua scripts and the stores built on them."""
