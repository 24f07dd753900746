"""Functions judged by the target: its own catalog says which calls a read may make.

On the allow path only functions the target's ``pg_proc`` marks non-volatile may be called,
less :data:`DENYLIST` (stable or immutable by the catalog, yet they touch state, other
sessions, or whole tables past masking) and plus :data:`HARMLESS` (built-ins volatile only
because each call returns something new). A function the catalog does not know for that number of
arguments, or whose candidates include a volatile one, holds the command. The gateway reads
the catalog through a read-only login (:data:`CATALOG_SQL`) and refreshes it on a schedule.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# Run as the read-only role: what it may execute, and where unqualified names resolve.
CATALOG_SQL = """
SELECT n.nspname, p.proname, p.pronargs, p.pronargdefaults, p.provariadic <> 0,
    p.provolatile::text
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE has_function_privilege(p.oid, 'EXECUTE')
"""
SEARCH_PATH_SQL = "SELECT current_schemas(true)"
# Every relation's columns (system ones too), by name: ``t.f`` is the column f when t has one,
# else the call f(t) on the whole row (see lineage). No privilege filter: names are not data.
COLUMNS_SQL = """
SELECT c.relname, array_agg(a.attname::text)
FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND NOT a.attisdropped
GROUP BY c.oid, c.relname
"""

DENYLIST = frozenset(
    """
    txid_current pg_current_xact_id
    table_to_xml table_to_xmlschema table_to_xml_and_xmlschema
    schema_to_xml schema_to_xmlschema schema_to_xml_and_xmlschema
    database_to_xml database_to_xmlschema database_to_xml_and_xmlschema
    query_to_xml query_to_xmlschema query_to_xml_and_xmlschema cursor_to_xml
    pg_stat_get_activity pg_stat_get_backend_activity pg_stat_get_backend_pid
    pg_stat_get_backend_userid pg_stat_get_backend_client_addr pg_stat_get_backend_wait_event
    pg_blocking_pids pg_safe_snapshot_blocking_pids pg_lock_status
    pg_relation_filepath pg_tablespace_location
    """.split()
)
HARMLESS = frozenset(
    """
    random random_normal clock_timestamp timeofday gen_random_uuid uuidv4 uuidv7
    uuid_generate_v4
    """.split()
)
VOLATILE = "v"
UNKNOWN = "is not a function the target knows"


@dataclass(frozen=True)
class Proc:
    """One overload of a function, as much as the classifier needs of it."""

    schema: str
    nargs: int
    defaults: int
    variadic: bool
    volatility: str  # i(mmutable), s(table) or v(olatile)

    def accepts(self, given: int) -> bool:
        if self.variadic:
            return given >= self.nargs - 1 - self.defaults
        return self.nargs - self.defaults <= given <= self.nargs


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one per load
class Catalog:
    procs: Mapping[str, tuple[Proc, ...]]  # by function name, every schema
    search_path: tuple[str, ...]  # where an unqualified name resolves (pg_catalog first)
    # by relation name, every schema: the columns all relations of that name have
    columns: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        rows: Iterable[tuple[str, str, int, int, bool, str]],
        search_path: Iterable[str],
        relations: Iterable[tuple[str, Iterable[str]]] = (),
    ) -> Catalog:
        procs: dict[str, list[Proc]] = {}
        for schema, name, nargs, defaults, variadic, volatility in rows:
            procs.setdefault(name, []).append(Proc(schema, nargs, defaults, variadic, volatility))
        path = tuple(s for s in search_path if not s.startswith("pg_temp"))
        columns: dict[str, frozenset[str]] = {}
        for relation, names in relations:  # same name in two schemas: only what both have
            found = frozenset(names)
            columns[relation] = columns[relation] & found if relation in columns else found
        return cls({name: tuple(found) for name, found in procs.items()}, path, columns)

    def judge(self, parts: tuple[str, ...], nargs: int) -> str | None:
        """Why a call of ``parts`` (``name`` or ``schema.name``) with ``nargs`` arguments
        must hold, or None when a read may make it."""
        name = parts[-1]
        schemas = parts[-2:-1] or self.search_path
        candidates = [
            p for p in self.procs.get(name, ()) if p.schema in schemas and p.accepts(nargs)
        ]
        if not candidates:
            return f"{UNKNOWN} with {nargs} argument(s)"
        if name in DENYLIST:
            return "touches state, other sessions or whole tables"
        if any(
            p.volatility == VOLATILE and not (name in HARMLESS and p.schema == "pg_catalog")
            for p in candidates
        ):
            return "is volatile on the target"
        return None
