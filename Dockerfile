# The keyturn image: keyturn[server] installed from uv.lock (every version and hash pinned), one
# installation for every process; docker-compose.yml runs each as `keyturn <command>`
# (tests/unit/test_deployment.py checks both files).
FROM python:3.12-slim
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
COPY scripts/lockfile.py ./scripts/
COPY keyturn ./keyturn
COPY gateway ./gateway
COPY bot ./bot
COPY vault_policies ./vault_policies
# uv comes from the lock too (hash-checked by pip), makes /app/.venv and is then removed
RUN python -m venv /opt/uv \
    && python scripts/lockfile.py uv-pin > /tmp/uv.txt \
    && /opt/uv/bin/pip install --no-cache-dir --no-deps --require-hashes -r /tmp/uv.txt \
    && /opt/uv/bin/uv sync --frozen --no-cache --no-editable --compile-bytecode --extra server \
    && rm -rf /opt/uv /tmp/uv.txt \
    && useradd --system keyturn
ENV PATH=/app/.venv/bin:$PATH KEYTURN_VAULT_POLICIES=/app/vault_policies
USER keyturn
ENTRYPOINT []
CMD ["keyturn", "--help"]
