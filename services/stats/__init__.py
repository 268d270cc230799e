"""The stats service: the read model of enrollments (roster and age metrics per course,
per campus and overall), kept up to date from the enrollment-events stream and served
over gRPC on port 50053."""
