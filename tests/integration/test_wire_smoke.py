import asyncio, pytest, psycopg
from keyturn.harness.tls import make_server_tls
from tests.integration.wire import wire_desk

@pytest.fixture(scope="session")
def tls(tmp_path_factory):
    return make_server_tls(tmp_path_factory.mktemp("tls"))

async def test_smoke(run_desk, idp, tls):
    token = idp.token("crew-billing")
    async with wire_desk(run_desk, tls) as w:
        conn = await psycopg.AsyncConnection.connect(w.url("crew-billing"), password=token, autocommit=True)
        cur = await conn.execute("SELECT id, name, email FROM customers ORDER BY id")
        print(await cur.fetchall())
        cur = await conn.execute("SELECT id, total FROM orders WHERE id = %s", (3,))
        print(await cur.fetchall())
        await conn.close()
