from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LayerInfo(_message.Message):
    __slots__ = ("name", "d_in", "d_out", "digest")
    NAME_FIELD_NUMBER: _ClassVar[int]
    D_IN_FIELD_NUMBER: _ClassVar[int]
    D_OUT_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    d_in: int
    d_out: int
    digest: str
    def __init__(self, name: _Optional[str] = ..., d_in: _Optional[int] = ..., d_out: _Optional[int] = ..., digest: _Optional[str] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeReply(_message.Message):
    __slots__ = ("model", "layers", "backends")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    backends: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., backends: _Optional[_Iterable[str]] = ...) -> None: ...

class LayerRef(_message.Message):
    __slots__ = ("name", "digest")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    digest: str
    def __init__(self, name: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class LayerGroup(_message.Message):
    __slots__ = ("layers",)
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerRef]
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerRef, _Mapping]]] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("backend", "public_context", "prepare")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PREPARE_FIELD_NUMBER: _ClassVar[int]
    backend: str
    public_context: bytes
    prepare: _containers.RepeatedCompositeFieldContainer[LayerGroup]
    def __init__(self, backend: _Optional[str] = ..., public_context: _Optional[bytes] = ..., prepare: _Optional[_Iterable[_Union[LayerGroup, _Mapping]]] = ...) -> None: ...

class OpenSessionReply(_message.Message):
    __slots__ = ("session_id", "prepare_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PREPARE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prepare_seconds: float
    def __init__(self, session_id: _Optional[str] = ..., prepare_seconds: _Optional[float] = ...) -> None: ...

class LinearRequest(_message.Message):
    __slots__ = ("session_id", "group", "ciphertexts")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    group: LayerGroup
    ciphertexts: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, session_id: _Optional[str] = ..., group: _Optional[_Union[LayerGroup, _Mapping]] = ..., ciphertexts: _Optional[_Iterable[bytes]] = ...) -> None: ...

class CiphertextList(_message.Message):
    __slots__ = ("ciphertexts",)
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    ciphertexts: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, ciphertexts: _Optional[_Iterable[bytes]] = ...) -> None: ...

class LinearReply(_message.Message):
    __slots__ = ("outputs", "compute_seconds")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[CiphertextList]
    compute_seconds: float
    def __init__(self, outputs: _Optional[_Iterable[_Union[CiphertextList, _Mapping]]] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class LinearBatchItem(_message.Message):
    __slots__ = ("session_id", "ciphertexts")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    ciphertexts: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, session_id: _Optional[str] = ..., ciphertexts: _Optional[_Iterable[bytes]] = ...) -> None: ...

class LinearBatchRequest(_message.Message):
    __slots__ = ("group", "items")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    group: LayerGroup
    items: _containers.RepeatedCompositeFieldContainer[LinearBatchItem]
    def __init__(self, group: _Optional[_Union[LayerGroup, _Mapping]] = ..., items: _Optional[_Iterable[_Union[LinearBatchItem, _Mapping]]] = ...) -> None: ...

class LinearBatchResult(_message.Message):
    __slots__ = ("outputs",)
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[CiphertextList]
    def __init__(self, outputs: _Optional[_Iterable[_Union[CiphertextList, _Mapping]]] = ...) -> None: ...

class LinearBatchReply(_message.Message):
    __slots__ = ("results", "compute_seconds")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[LinearBatchResult]
    compute_seconds: float
    def __init__(self, results: _Optional[_Iterable[_Union[LinearBatchResult, _Mapping]]] = ..., compute_seconds: _Optional[float] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
