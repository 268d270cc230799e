"""Use cases of the notifier: recording commands and delivering pending emails."""
