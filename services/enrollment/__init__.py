"""Enrollment: owns the catalogue and every decision; the single writer of each course's seats."""
