-- The Debezium side of the EHR database (run after ehr-schema.sql; deploy/postgres/debezium.sh passes
-- the variables). Follows Debezium's documented least-privilege setup for pgoutput:
--   * a LOGIN REPLICATION user that can read the tables (snapshot) and stream the WAL,
--   * the tables owned by a group role both the EHR admin and Debezium belong to, because
--     `publication.autocreate.mode=filtered` creates/alters a publication, which needs ownership,
--   * REPLICA IDENTITY FULL, so updates and deletes carry the whole old row: the CDC parser then
--     knows which values an update cleared and which patient a deleted row belonged to.
-- psql variables: debezium_user, debezium_password, admin_user, database.

SELECT format('CREATE ROLE %I LOGIN REPLICATION PASSWORD %L', :'debezium_user', :'debezium_password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'debezium_user') \gexec
SELECT 'CREATE ROLE ehr_replication_group NOLOGIN'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ehr_replication_group') \gexec

GRANT ehr_replication_group TO :"admin_user";
GRANT ehr_replication_group TO :"debezium_user";
GRANT CREATE ON DATABASE :"database" TO :"debezium_user";
GRANT USAGE ON SCHEMA public TO :"debezium_user";
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"debezium_user";

ALTER TABLE patients    OWNER TO ehr_replication_group;
ALTER TABLE encounters  OWNER TO ehr_replication_group;
ALTER TABLE vital_signs OWNER TO ehr_replication_group;
ALTER TABLE lab_results OWNER TO ehr_replication_group;

ALTER TABLE patients    REPLICA IDENTITY FULL;
ALTER TABLE encounters  REPLICA IDENTITY FULL;
ALTER TABLE vital_signs REPLICA IDENTITY FULL;
ALTER TABLE lab_results REPLICA IDENTITY FULL;
