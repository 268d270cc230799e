"""The four course-signup services: registration, enrollment, stats, notifier."""
