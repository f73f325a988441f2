"""End-to-end tests: the command line, the seeds' snippets, examples, every execution context."""
