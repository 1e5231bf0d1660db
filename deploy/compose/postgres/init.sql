-- Run once by the postgres image's entrypoint, on an empty data directory, as the superuser in
-- POSTGRES_DB (blog). pg_stat_statements is preloaded by the server's command line
-- (docker-compose.yml); here it is created in the database the exporter connects to.
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;

-- The exporter: read-only monitoring through the built-in pg_monitor role, nothing more.
CREATE ROLE pgcache_exporter LOGIN PASSWORD 'pgcache_exporter' IN ROLE pg_monitor;

-- The demo application (the workload service): owns the blog database, so it can create its tables.
CREATE ROLE blog LOGIN PASSWORD 'blog';
ALTER DATABASE blog OWNER TO blog;
