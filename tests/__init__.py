"""recgpt test suite."""
