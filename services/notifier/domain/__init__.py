"""Pure rules of the notifier: what a notification is, how it becomes an email, when to retry."""
