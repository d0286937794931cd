"""The adapters: Redis (`redis/`), in memory (`memory/`), the LLM providers (`llm/`), the tokenizer."""
