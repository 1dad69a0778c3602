"""Container images of maw (Dockerfiles) and the compose healthcheck script they ship."""
