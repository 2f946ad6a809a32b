"""The command side: HTTP handlers, command handlers, and workers reacting to events."""
