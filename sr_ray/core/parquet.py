"""Parquet input: footers checked before Ray starts, and a row-group reader that names what it cannot read.

:func:`inspect_files` opens every file's footer (in threads) and returns its size, modification time, rows
per row group and schema: a file that is not Parquet, has a corrupt footer, or a folder with no Parquet at
all is a :class:`DataError` naming the file, before the cluster does anything.

:class:`RowGroupSource` is a Ray Data ``Datasource`` (``ray.data.read_datasource``) over those files, one
block per row group (sliced to ``max_rows_per_block``). It exists because ``read_parquet`` can do neither
of two things the jobs need: name the file and row group behind an unreadable data page (a corrupt page
behind an intact footer passes every footer check; ``read_parquet`` then fails the whole job with a message
that names no file), and read files whose schemas differ in optional columns into one schema. Each block
gets ``__file`` (the file's URI) and ``__error`` (null, or why its rows could not be read): a row group
that cannot be read becomes rows with ``__error`` set, with ``key_columns`` filled when those alone can be
read, so a job counts them as bad rows by name instead of dying; ``on_error="raise"`` fails with a
:class:`DataError` naming file and row group instead.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from sr_ray.core import storage
from sr_ray.core.errors import DataError

log = logging.getLogger(__name__)

FILE_COL, ERROR_COL = "__file", "__error"
ROW_COL = "__row"


@dataclass
class ParquetFile:
    uri: str            # local path or s3://bucket/key
    path: str           # the filesystem's own path
    size: int
    mtime_ns: int
    rows: int
    row_groups: list[int]   # rows per row group
    schema: Any = field(repr=False)   # pyarrow.Schema

    def identity(self) -> dict[str, Any]:
        """What tells this file from another (or from itself rewritten): URI, size and modification time."""
        return {"uri": self.uri, "size": self.size, "mtime_ns": self.mtime_ns}


def inspect_files(uri: str, what: str, endpoint: str | None = None) -> list[ParquetFile]:
    """Every Parquet file under ``uri`` with its footer facts; :class:`DataError` names ``what`` and the file.

    Files without the ``.parquet`` suffix (a README, a _SUCCESS marker's siblings) are skipped, and said so
    in the log; a ``.parquet`` file that is not Parquet or whose footer is corrupt is an error.
    """
    ignored: list[str] = []
    try:
        paths = storage.list_files(uri, endpoint=endpoint, ignored=ignored)
    except FileNotFoundError:
        raise DataError(f"{what}={storage.redact(uri)}: no such file or folder") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{what}={storage.redact(uri)}: cannot list it ({e})") from None
    if ignored:
        log.warning("%s: ignoring %d file(s) that are not .parquet, e.g. %s", what, len(ignored), ignored[:3])
    if not paths:
        raise DataError(f"{what}={storage.redact(uri)}: no .parquet files there")
    fs, _ = storage.resolve(uri, endpoint)
    s3 = storage.is_s3(uri)

    def one(path: str) -> ParquetFile:
        shown = storage.to_uri(path, s3)
        try:
            info = fs.get_file_info(path)
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
        except Exception as e:
            raise DataError(f"{what}: {shown} is not a readable Parquet file (corrupt or not Parquet: "
                            f"{type(e).__name__}: {e})") from None
        groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        return ParquetFile(shown, path, int(info.size or 0), int(info.mtime_ns or 0), meta.num_rows, groups, schema)

    with ThreadPoolExecutor(min(16, len(paths))) as ex:
        return list(ex.map(one, paths))


def inputs(uri: str, what: str, need: Sequence[str], one_of: Sequence[str] = (), kinds: dict[str, str] | None = None,
           endpoint: str | None = None, expected: str = "") -> list[ParquetFile]:
    """:func:`inspect_files`, then every file checked for ``need`` columns, at least one of ``one_of``, and the
    column types in ``kinds`` (see :func:`check_column_types`); ``expected`` describes the contract in errors."""
    files = inspect_files(uri, what, endpoint)
    for f in files:
        cols = f.schema.names
        lacking = [c for c in need if c not in cols]
        if one_of and not any(c in cols for c in one_of):
            lacking.append(" or ".join(one_of))
        if lacking:
            raise DataError(f"{what}: {f.uri} lacks column(s) {lacking}; {expected + '; ' if expected else ''}"
                            f"has {cols}")
    check_column_types(files, what, kinds or {})
    return files


def is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def check_column_types(files: Sequence[ParquetFile], what: str, kinds: dict[str, str]) -> None:
    """``kinds``: column -> "string" | "binary" | "id" (string or integer); a present column of another type is
    a :class:`DataError` naming file, column and type (a column of Arrow's null type, all nulls, passes: its
    rows are bad rows). ``id`` columns must also agree across files."""
    test = {"string": is_string, "binary": is_binary,
            "id": lambda t: is_string(t) or pa.types.is_integer(t)}
    first: dict[str, tuple[str, pa.DataType]] = {}
    for f in files:
        for col, kind in kinds.items():
            if col not in f.schema.names:
                continue
            t = f.schema.field(col).type
            if pa.types.is_null(t):  # written with no value at all (an empty or all-null column): nothing is wrong
                continue
            if not test[kind](t):
                want = {"id": "string or integer"}.get(kind, kind)
                raise DataError(f"{what}: {f.uri} column {col!r} is {t}, expected {want}")
            if kind == "id":
                seen = first.setdefault(col, (f.uri, t))
                if (is_string(seen[1]), pa.types.is_integer(seen[1])) != (is_string(t), pa.types.is_integer(t)):
                    raise DataError(f"{what}: column {col!r} is {seen[1]} in {seen[0]} but {t} in {f.uri}; "
                                    f"one type across files, please")


def target_schema(files: Sequence[ParquetFile], columns: Sequence[str]) -> pa.Schema:
    """One schema for ``columns`` over files that may each lack some: the first type seen for each column,
    strings widened to large_string and binaries to large_binary (so files of either width fit)."""
    fields = {}
    for f in files:
        for c in columns:
            if c in f.schema.names and c not in fields:
                t = f.schema.field(c).type
                t = pa.large_string() if is_string(t) else pa.large_binary() if is_binary(t) else t
                fields[c] = pa.field(c, t)
    return pa.schema([fields.get(c, pa.field(c, pa.null())) for c in columns])


def _conform(table: pa.Table, schema: pa.Schema, file_uri: str, error: str | None, n: int) -> pa.Table:
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(n, f.type)
            for f in schema]
    cols += [pa.array([file_uri] * n, pa.large_string()), pa.array([error] * n, pa.large_string())]
    return pa.Table.from_arrays(cols, schema=out_schema(schema))


def out_schema(schema: pa.Schema) -> pa.Schema:
    return schema.append(pa.field(FILE_COL, pa.large_string())).append(pa.field(ERROR_COL, pa.large_string()))


class RowGroupSource:
    """A Ray Data datasource over Parquet row groups (see the module docstring); build with :func:`read`."""

    def __init__(self, files: Sequence[ParquetFile], columns: Sequence[str], what: str, endpoint: str | None = None,
                 key_columns: Sequence[str] = (), max_rows_per_block: int = 0, on_error: str = "rows",
                 row_index: bool = False):
        if on_error not in ("rows", "raise"):
            raise ValueError("on_error must be rows or raise")
        self.files = [(f.uri, f.path, f.row_groups, [c for c in columns if c in f.schema.names]) for f in files]
        self.schema = target_schema(files, columns)
        self.key_columns, self.what = list(key_columns), what
        self.max_rows, self.on_error = max_rows_per_block, on_error
        self.endpoint = endpoint
        self.est_bytes = sum(f.size for f in files)
        self.uri = files[0].uri if files else ""
        self.row_index = row_index
        self.offsets = [sum(f.rows for f in files[:i]) for i in range(len(files))]

    def schema_out(self) -> pa.Schema:
        out = out_schema(self.schema)
        return out.append(pa.field(ROW_COL, pa.int64())) if self.row_index else out

    def units(self) -> list[tuple[int, int, int]]:
        """(file index, row group, rows) of every row group."""
        return [(i, g, n) for i, (_, _, groups, _) in enumerate(self.files) for g, n in enumerate(groups) if n]

    def read_unit(self, fs, i: int, group: int) -> list[pa.Table]:
        """One row group as blocks of at most ``max_rows_per_block`` rows (the ``read_fn`` body, testable alone)."""
        uri, path, groups, present = self.files[i]
        try:
            with fs.open_input_file(path) as f:
                table = pq.ParquetFile(f).read_row_group(group, columns=present)
            table = _conform(table, self.schema, uri, None, table.num_rows)
        except Exception as e:  # a corrupt data page: pyarrow raises OSError/ArrowInvalid with no file name
            msg = (f"{self.what}: {uri} row group {group} (rows {sum(groups[:group])}.."
                   f"{sum(groups[:group + 1]) - 1}) is unreadable: {type(e).__name__}: {e}")
            if self.on_error == "raise":
                raise DataError(msg) from None
            table = self._salvage(fs, path, group, groups[group], present, uri, msg)
        if self.row_index:  # the row's place in the files' order: a stable key across runs and stages
            start = self.offsets[i] + sum(groups[:group])
            table = table.append_column(ROW_COL, pa.array(range(start, start + table.num_rows), pa.int64()))
        step = self.max_rows or table.num_rows or 1
        return [table.slice(s, step) for s in range(0, table.num_rows, step)]

    def _salvage(self, fs, path, group, rows, present, uri, msg) -> pa.Table:
        """The rows of an unreadable row group, with its key columns when those alone can be read."""
        keys = [c for c in self.key_columns if c in present]
        try:
            with fs.open_input_file(path) as f:
                table = pq.ParquetFile(f).read_row_group(group, columns=keys) if keys else pa.table({})
        except Exception:
            table = pa.table({})
        if table.num_rows != rows:
            table = pa.table({})
        log.warning("%s; its %d rows are counted as bad rows", msg, rows)
        return _conform(table, self.schema, uri, msg, rows)


def _datasource_class():
    """RowGroupSource as a ``ray.data.Datasource`` subclass (Ray imported only where a dataset is built)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class _Source(Datasource, RowGroupSource):
        def __init__(self, *args, **kwargs):
            Datasource.__init__(self)
            RowGroupSource.__init__(self, *args, **kwargs)

        def get_name(self) -> str:
            return "ReadParquetRowGroups"

        def estimate_inmemory_data_size(self) -> int | None:
            return self.est_bytes or None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
            units = self.units()
            k = max(1, min(parallelism, len(units)))
            chunks = [units[j::k] for j in range(k)]
            chunks = [sorted(c) for c in chunks if c]
            return [ReadTask(self._reader(c), BlockMetadata(
                num_rows=sum(n for _, _, n in c), size_bytes=None, exec_stats=None,
                input_files=sorted({self.files[i][0] for i, _, _ in c})),
                schema=self.schema_out(), per_task_row_limit=per_task_row_limit) for c in chunks]

        def _reader(self, chunk):
            def read():
                fs, _ = storage.resolve(self.uri, self.endpoint)
                for i, group, _ in chunk:
                    yield from self.read_unit(fs, i, group)
            return read

    return _Source


def read(files: Sequence[ParquetFile], columns: Sequence[str], what: str, endpoint: str | None = None,
         key_columns: Sequence[str] = (), max_rows_per_block: int = 0, on_error: str = "rows", row_index: bool = False,
         ordered: bool = False, **read_args):
    """A lazy Ray Dataset of ``columns`` (+ ``__file``, ``__error``, and with ``row_index`` ``__row``: the row's
    number counted over ``files`` in order) over ``files``' row groups.

    ``ordered``: one read task per row group, so that (with Ray Data's ``preserve_order``) rows and block boundaries
    come the same on any cluster. Otherwise Ray sizes the read from the cluster's CPUs and deals row groups to the
    tasks in turn, so the order depends on how many CPUs the cluster has at that moment (seen: a run restored on
    the two nodes left after losing one was fed another order than on three)."""
    import ray.data

    source = _datasource_class()(files, columns, what, endpoint, key_columns, max_rows_per_block, on_error,
                                 row_index)
    if ordered:
        read_args["override_num_blocks"] = max(1, len(source.units()))
    return ray.data.read_datasource(source, **read_args)


def data_error_of(exc: BaseException) -> DataError | None:
    """The :class:`DataError` behind an exception a Ray task or Ray Data raised (its cause), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        if isinstance(exc, DataError) and not isinstance(cause, BaseException):
            return exc
        exc = cause if isinstance(cause, BaseException) else exc.__cause__
    return None
