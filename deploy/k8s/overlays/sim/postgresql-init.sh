# Sourced by the postgres image's entrypoint on first start (empty data directory only).
# One login role and one database per Veil service: least privilege even in sim.
# The passwords come from the Secret veil-postgresql (./bootstrap-secrets.sh). No `set`
# here: the file is sourced, and the entrypoint's own `set -e` already stops on a failure.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v keyvault_password="$KEYVAULT_DB_PASSWORD" -v state_password="$STATE_DB_PASSWORD" <<'SQL'
CREATE ROLE keyvault LOGIN PASSWORD :'keyvault_password';
CREATE ROLE state LOGIN PASSWORD :'state_password';
CREATE DATABASE keyvault OWNER keyvault;
CREATE DATABASE state OWNER state;
REVOKE ALL ON DATABASE keyvault FROM PUBLIC;
REVOKE ALL ON DATABASE state FROM PUBLIC;
SQL
