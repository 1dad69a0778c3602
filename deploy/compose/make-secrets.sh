#!/bin/sh
# Create what the compose deployment needs that must never be committed (once; kept across runs):
# - secrets/jwt-private.pem, jwt-public.pem: the Ed25519 key pair of access tokens (only the registry
#   gets the private key; every service verifies with the public key);
# - secrets/<service>.env: each service's own credential for internal calls (maw_svc_...) and the
#   SHA-256 of every service's credential, which each service checks callers against;
# - secrets/agent_credential: empty until an agent is enrolled (docs/deploy.md).
set -eu
cd "$(dirname "$0")"
umask 077
mkdir -p secrets
if [ ! -f secrets/jwt-private.pem ]; then
    openssl genpkey -algorithm ed25519 -out secrets/jwt-private.pem
    openssl pkey -in secrets/jwt-private.pem -pubout -out secrets/jwt-public.pem
fi
services="registry scheduler evaluator"
for service in $services; do
    # 256 random bits in base64url, like services.runtime.auth.new_secret.
    [ -f "secrets/$service.credential" ] ||
        printf 'maw_svc_%s' "$(openssl rand -base64 32 | tr '+/' '-_' | tr -d '=\n')" > "secrets/$service.credential"
done
hashes=""
for service in $services; do
    digest=$(openssl dgst -sha256 -r < "secrets/$service.credential" | cut -d' ' -f1)
    hashes="${hashes:+$hashes,}$service:$digest"
done
for service in $services; do
    printf 'MAW_SERVICE_CREDENTIAL=%s\nMAW_SERVICE_CREDENTIAL_HASHES=%s\n' \
        "$(cat "secrets/$service.credential")" "$hashes" > "secrets/$service.env"
done
[ -f secrets/agent_credential ] || : > secrets/agent_credential
# Compose file secrets are bind mounts: the containers' users (uid 10001, 10002) need read access;
# the 0700 secrets/ directory keeps other users of this host out.
chmod 644 secrets/jwt-public.pem secrets/jwt-private.pem secrets/agent_credential
echo "secrets in $(pwd)/secrets"
