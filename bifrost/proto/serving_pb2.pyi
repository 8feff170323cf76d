from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttestRequest(_message.Message):
    __slots__ = ("nonce", "client_public_key", "suite")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SUITE_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    client_public_key: bytes
    suite: str
    def __init__(self, nonce: _Optional[bytes] = ..., client_public_key: _Optional[bytes] = ..., suite: _Optional[str] = ...) -> None: ...

class AttestReply(_message.Message):
    __slots__ = ("evidence_type", "evidence", "endorsements", "server_public_key", "model_digest", "serving_config_digest", "session_id", "token", "token_expires_at", "suite")
    class EndorsementsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    EVIDENCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    ENDORSEMENTS_FIELD_NUMBER: _ClassVar[int]
    SERVER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SERVING_CONFIG_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SUITE_FIELD_NUMBER: _ClassVar[int]
    evidence_type: str
    evidence: bytes
    endorsements: _containers.ScalarMap[str, bytes]
    server_public_key: bytes
    model_digest: bytes
    serving_config_digest: bytes
    session_id: bytes
    token: str
    token_expires_at: int
    suite: str
    def __init__(self, evidence_type: _Optional[str] = ..., evidence: _Optional[bytes] = ..., endorsements: _Optional[_Mapping[str, bytes]] = ..., server_public_key: _Optional[bytes] = ..., model_digest: _Optional[bytes] = ..., serving_config_digest: _Optional[bytes] = ..., session_id: _Optional[bytes] = ..., token: _Optional[str] = ..., token_expires_at: _Optional[int] = ..., suite: _Optional[str] = ...) -> None: ...

class SealedRequest(_message.Message):
    __slots__ = ("session_id", "request_id", "sealed")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    session_id: bytes
    request_id: str
    sealed: bytes
    def __init__(self, session_id: _Optional[bytes] = ..., request_id: _Optional[str] = ..., sealed: _Optional[bytes] = ...) -> None: ...

class SealedReply(_message.Message):
    __slots__ = ("sealed",)
    SEALED_FIELD_NUMBER: _ClassVar[int]
    sealed: bytes
    def __init__(self, sealed: _Optional[bytes] = ...) -> None: ...

class CloseSessionReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "task", "model_digest", "serving_config_digest", "max_prompt_tokens", "max_new_tokens", "context_tokens", "replicas", "mode")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SERVING_CONFIG_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    task: str
    model_digest: bytes
    serving_config_digest: bytes
    max_prompt_tokens: int
    max_new_tokens: int
    context_tokens: int
    replicas: int
    mode: str
    def __init__(self, name: _Optional[str] = ..., task: _Optional[str] = ..., model_digest: _Optional[bytes] = ..., serving_config_digest: _Optional[bytes] = ..., max_prompt_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., context_tokens: _Optional[int] = ..., replicas: _Optional[int] = ..., mode: _Optional[str] = ...) -> None: ...

class ListModelsReply(_message.Message):
    __slots__ = ("models", "evidence_type", "max_sessions")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_TYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    evidence_type: str
    max_sessions: int
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., evidence_type: _Optional[str] = ..., max_sessions: _Optional[int] = ...) -> None: ...

class GenerateBody(_message.Message):
    __slots__ = ("prompt", "max_new_tokens", "reset_history", "has_sample_seed", "sample_seed", "messages", "temperature", "top_p", "top_k", "stop")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESET_HISTORY_FIELD_NUMBER: _ClassVar[int]
    HAS_SAMPLE_SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SEED_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_new_tokens: int
    reset_history: bool
    has_sample_seed: bool
    sample_seed: int
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    temperature: float
    top_p: float
    top_k: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., reset_history: _Optional[bool] = ..., has_sample_seed: _Optional[bool] = ..., sample_seed: _Optional[int] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("token_ids", "text", "done", "token_seconds", "prompt_tokens", "error", "error_code", "finish_reason")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    done: bool
    token_seconds: float
    prompt_tokens: int
    error: str
    error_code: str
    finish_reason: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., done: _Optional[bool] = ..., token_seconds: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., error: _Optional[str] = ..., error_code: _Optional[str] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class EmbedBody(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class Vector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedResult(_message.Message):
    __slots__ = ("vectors", "error", "error_code")
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    vectors: _containers.RepeatedCompositeFieldContainer[Vector]
    error: str
    error_code: str
    def __init__(self, vectors: _Optional[_Iterable[_Union[Vector, _Mapping]]] = ..., error: _Optional[str] = ..., error_code: _Optional[str] = ...) -> None: ...

class CloseBody(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
