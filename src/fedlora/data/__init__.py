"""Data layer: load a table, turn rows into prompts, split rows across federated clients."""

from fedlora.data.partition import ClientData, Partition, make_partition, partition_summary
from fedlora.data.tables import ColumnInfo, DataError, Table, list_builtins, load_table
from fedlora.data.text import RowSerializer

__all__ = [
    "ClientData",
    "ColumnInfo",
    "DataError",
    "Partition",
    "RowSerializer",
    "Table",
    "list_builtins",
    "load_table",
    "make_partition",
    "partition_summary",
]
