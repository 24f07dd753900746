# The keyturn image: one installation for every process; docker-compose.yml runs each as
# `keyturn <command>` (tests/unit/test_deployment.py checks both files).
FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY keyturn ./keyturn
COPY gateway ./gateway
COPY bot ./bot
COPY vault_policies ./vault_policies
RUN pip install --no-cache-dir . && useradd --system keyturn
ENV KEYTURN_VAULT_POLICIES=/app/vault_policies
USER keyturn
ENTRYPOINT []
CMD ["keyturn", "--help"]
