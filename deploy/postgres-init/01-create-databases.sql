-- Run once by the postgres image on an empty data directory (mounted into
-- /docker-entrypoint-initdb.d by docker-compose.yml): one database per service that
-- keeps state. registration is stateless and has none.
CREATE DATABASE enrollment;
CREATE DATABASE stats;
CREATE DATABASE notifier;
