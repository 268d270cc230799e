"""The notifier service: consumes SendNotification commands and emails students.

Commands from the `notifications` stream are recorded in the service's own database
inside the consumer's checkpoint transaction (one row per registration and kind, so a
redelivered command records nothing new); an asyncio sender then delivers the pending
rows over a small pool of reused SMTP connections, retrying transient failures.
"""
