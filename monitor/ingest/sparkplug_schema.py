"""The Sparkplug B payload schema (Eclipse Tahu's `org.eclipse.tahu.protobuf.Payload`), built with protobuf.

Only the fields the monitor reads or writes are declared, with the field numbers and wire types of the Sparkplug
B specification; protobuf skips the others (metadata, properties, data sets, templates, extensions) as unknown
fields, so any conforming payload parses. Built from a `FileDescriptorProto` at import time instead of a
generated `_pb2` module: no protoc and no generated code to keep in step with the protobuf runtime.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "org.eclipse.tahu.protobuf"

# Metric data types (the specification's DataType enumeration) the monitor reads as samples.
INT8, INT16, INT32, INT64 = 1, 2, 3, 4
UINT8, UINT16, UINT32, UINT64 = 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN, STRING = 9, 10, 11, 12
NUMERIC_TYPES = frozenset((INT8, INT16, INT32, INT64, UINT8, UINT16, UINT32, UINT64, FLOAT, DOUBLE))
SIGNED_BITS = {INT8: 32, INT16: 32, INT32: 32, INT64: 64}  # signed values travel as two's complement uint32/uint64

_T = descriptor_pb2.FieldDescriptorProto
_METRIC_FIELDS = (  # name, number, type; the value fields (10-16) form the oneof `value`
    ("name", 1, _T.TYPE_STRING),
    ("alias", 2, _T.TYPE_UINT64),
    ("timestamp", 3, _T.TYPE_UINT64),
    ("datatype", 4, _T.TYPE_UINT32),
    ("is_historical", 5, _T.TYPE_BOOL),
    ("is_transient", 6, _T.TYPE_BOOL),
    ("is_null", 7, _T.TYPE_BOOL),
    ("int_value", 10, _T.TYPE_UINT32),
    ("long_value", 11, _T.TYPE_UINT64),
    ("float_value", 12, _T.TYPE_FLOAT),
    ("double_value", 13, _T.TYPE_DOUBLE),
    ("boolean_value", 14, _T.TYPE_BOOL),
    ("string_value", 15, _T.TYPE_STRING),
    ("bytes_value", 16, _T.TYPE_BYTES),
)
_FIRST_VALUE_FIELD = 10
_PAYLOAD_FIELDS = (
    ("timestamp", 1, _T.TYPE_UINT64),
    ("seq", 3, _T.TYPE_UINT64),
    ("uuid", 4, _T.TYPE_STRING),
    ("body", 5, _T.TYPE_BYTES),
)


def _build() -> Any:
    """The Payload message class, from a private pool (it cannot clash with another copy of the schema)."""
    schema = descriptor_pb2.FileDescriptorProto(name="monitor_sparkplug_b.proto", package=PACKAGE, syntax="proto2")
    payload = schema.message_type.add(name="Payload")
    for name, number, kind in _PAYLOAD_FIELDS:
        payload.field.add(name=name, number=number, type=kind, label=_T.LABEL_OPTIONAL)
    payload.field.add(
        name="metrics", number=2, type=_T.TYPE_MESSAGE, label=_T.LABEL_REPEATED, type_name=f".{PACKAGE}.Payload.Metric"
    )
    metric = payload.nested_type.add(name="Metric")
    metric.oneof_decl.add(name="value")
    for name, number, kind in _METRIC_FIELDS:
        field = metric.field.add(name=name, number=number, type=kind, label=_T.LABEL_OPTIONAL)
        if number >= _FIRST_VALUE_FIELD:
            field.oneof_index = 0
    pool = descriptor_pool.DescriptorPool()
    pool.Add(schema)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.Payload"))


Payload: Any = _build()
