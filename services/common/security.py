"""Transport security and caller authentication for every gRPC server and client of the system.

Server side (used by services.common.service):
- TLS when IEX_TLS_CERT and IEX_TLS_KEY are set; mTLS when IEX_TLS_CA is set and
  IEX_TLS_REQUIRE_CLIENT_CERT is true. The files are watched: a rotated certificate (cert-manager,
  a re-mounted Secret) is used for new connections without a restart.
- `AuthInterceptor`, generic over services: a set of full method names ("/iex.v1.PlannerService/
  CreateExploration") that need credentials, checked before the servicer runs. A credential is a
  bearer token (`authorization: Bearer <token>` metadata) from IEX_AUTH_TOKENS / IEX_AUTH_TOKENS_FILE,
  or, under mTLS, a verified client certificate whose identity is in IEX_AUTH_CLIENT_IDENTITIES.
  Missing or wrong credentials end the call with UNAUTHENTICATED; a verified certificate whose
  identity is not accepted ends it with PERMISSION_DENIED. Tokens are compared in constant time and
  are never logged or used as metric labels: logs name the token (its `name:` part) instead.

Client side (the CLI, service-to-service calls, tests): `client_channel()` dials with TLS when a
CA is configured, presents the client certificate when one is, and attaches the bearer token.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import grpc

from services.common import settings as settings_mod
from services.common.settings import SettingsError, env_name, setting

log = logging.getLogger(__name__)

# RPCs that change state or act on the caller's behalf, by service. Reads (Get/List/Watch, status
# pages), health checks and reflection stay open so that dashboards and probes work without tokens.
MUTATING_METHODS: Mapping[str, tuple[str, ...]] = {
    "iex.v1.PlannerService": ("CreateExploration", "PauseExploration", "ResumeExploration", "CancelExploration"),
    # Makes the crawler fetch a URL the caller chooses: without credentials it is an open proxy.
    "iex.v1.CrawlerService": ("ProbeUrl",),
}

# Never protected, whatever IEX_AUTH_PROTECT says: kubelet probes and grpcurl discovery need them.
ALWAYS_OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"})

MIN_TOKEN_LENGTH = 16
AUTHORIZATION = "authorization"
BEARER = "bearer "
ANY_IDENTITY = "*"

# Reasons are metric label values: a fixed, small set.
MISSING, INVALID_TOKEN, IDENTITY_REFUSED = "missing_credentials", "invalid_token", "identity_not_accepted"


def full_method_names(table: Mapping[str, Iterable[str]]) -> frozenset[str]:
    return frozenset(f"/{service}/{method}" for service, methods in table.items() for method in methods)


PROTECTED_METHODS: frozenset[str] = full_method_names(MUTATING_METHODS)


# --------------------------------------------------------------------------------------------
# Files


def _read_file(path: str, var: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(f"{var}: cannot read {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise SettingsError(f"{var}: {path} is empty")
    return data


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return -1.0


# --------------------------------------------------------------------------------------------
# S3 credentials


def _is_loopback_endpoint(endpoint: str) -> bool:
    host = endpoint.strip().removeprefix("http://").removeprefix("https://").rsplit(":", 1)[0].strip("[]").lower()
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def refuse_builtin_s3_credentials(settings: Any) -> None:
    """The built-in S3 keys are the local stack's; anywhere else credentials come from the environment (a Secret).

    A deployment that forgets to mount its S3 Secret would otherwise start with keys anyone can
    read in this repository, against a server that might accept them.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(settings_mod.ServiceSettings)}
    builtin = [
        env_name(name) for name in ("s3_access_key", "s3_secret_key") if getattr(settings, name, None) == defaults.get(name)
    ]
    if builtin and not _is_loopback_endpoint(settings.s3_endpoint):
        raise SettingsError(
            f"{builtin[0]}: the built-in local-stack credentials are refused for S3 at {settings.s3_endpoint}; "
            "set IEX_S3_ACCESS_KEY and IEX_S3_SECRET_KEY from a secret"
        )


# --------------------------------------------------------------------------------------------
# Server TLS


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    ca: str = ""
    require_client_cert: bool = False

    @classmethod
    def from_settings(cls, settings: Any) -> "TlsFiles | None":
        """The server's TLS configuration, None for plaintext; SettingsError for a half-made one."""
        cert, key, ca = settings.tls_cert.strip(), settings.tls_key.strip(), settings.tls_ca.strip()
        if bool(cert) != bool(key):
            missing = env_name("tls_key") if cert else env_name("tls_cert")
            raise SettingsError(f"{missing}: required when {env_name('tls_cert') if cert else env_name('tls_key')} is set")
        if settings.tls_require_client_cert and not ca:
            raise SettingsError(f"{env_name('tls_ca')}: required when {env_name('tls_require_client_cert')} is true (it verifies client certificates)")
        if settings.tls_require_client_cert and not cert:
            raise SettingsError(f"{env_name('tls_cert')}: required when {env_name('tls_require_client_cert')} is true (mTLS needs TLS)")
        if not cert:
            return None
        files = cls(cert=cert, key=key, ca=ca, require_client_cert=bool(settings.tls_require_client_cert))
        files.configuration()  # unreadable files stop the service at start-up, naming the variable
        return files

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        pair = (_read_file(self.key, env_name("tls_key")), _read_file(self.cert, env_name("tls_cert")))
        roots = _read_file(self.ca, env_name("tls_ca")) if self.ca and self.require_client_cert else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=roots)

    def stamp(self) -> tuple[float, ...]:
        return tuple(_mtime(p) for p in (self.cert, self.key, self.ca) if p)


class _ReloadingCertificates:
    """Hands gRPC a new certificate configuration when the files change (checked at most once a second)."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._stamp = files.stamp()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            now = time.monotonic()
            if now - self._checked < 1.0:
                return None
            self._checked = now
            stamp = self.files.stamp()
            if stamp == self._stamp:
                return None
            try:
                configuration = self.files.configuration()
            except SettingsError as exc:
                # Half-written files during a rotation: keep serving with the current certificate.
                log.warning("TLS files changed but cannot be read yet; keeping the current certificate", extra={"error": str(exc)})
                return None
            self._stamp = stamp
            log.info("TLS certificate reloaded", extra={"cert": self.files.cert})
            return configuration


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    return grpc.dynamic_ssl_server_credentials(
        files.configuration(), _ReloadingCertificates(files), require_client_authentication=files.require_client_cert
    )


# --------------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True)
class Token:
    name: str
    secret: bytes = field(repr=False)


def parse_tokens(text: str, source: str) -> list[Token]:
    """'name:token' or 'token' entries separated by commas or new lines; '#' starts a comment line."""
    tokens: list[Token] = []
    entries = [part.strip() for line in text.splitlines() if not line.strip().startswith("#") for part in line.split(",")]
    for entry in entries:
        if not entry:
            continue
        name, sep, secret = entry.partition(":")
        if not sep:
            name, secret = f"token-{len(tokens) + 1}", entry
        name, secret = name.strip(), secret.strip()
        if len(secret) < MIN_TOKEN_LENGTH:
            # The message names the entry by position and name only: never echo a secret.
            raise SettingsError(f"{source}: token {name!r} is shorter than {MIN_TOKEN_LENGTH} characters")
        if any(ch.isspace() for ch in secret):
            raise SettingsError(f"{source}: token {name!r} contains white space")
        tokens.append(Token(name=name, secret=secret.encode()))
    return tokens


class TokenSet:
    """Accepted tokens from the setting and the file; the file is re-read when it changes."""

    def __init__(self, inline: str = "", path: str = "") -> None:
        self._inline = parse_tokens(inline, env_name("auth_tokens")) if inline else []
        self.path = path
        self._from_file: list[Token] = []
        self._stamp = -2.0
        self._checked = 0.0
        self._lock = threading.Lock()
        if path:
            self._reload(force=True)

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < 1.0:
            return
        self._checked = now
        stamp = _mtime(self.path)
        if stamp == self._stamp and not force:
            return
        try:
            tokens = parse_tokens(_read_file(self.path, env_name("auth_tokens_file")).decode("utf-8", "replace"), env_name("auth_tokens_file"))
        except SettingsError:
            if force:
                raise
            log.warning("token file changed but cannot be used; keeping the previous tokens", extra={"file": self.path})
            return
        self._from_file, self._stamp = tokens, stamp
        if not force:
            log.info("token file reloaded", extra={"file": self.path, "tokens": len(tokens)})

    def tokens(self) -> list[Token]:
        with self._lock:
            if self.path:
                self._reload()
            return [*self._inline, *self._from_file]

    def __len__(self) -> int:
        return len(self.tokens())

    def match(self, presented: str) -> str | None:
        """The name of the token equal to `presented`, or None; compares against every token in constant time."""
        candidate = presented.encode()
        found = None
        for token in self.tokens():
            # No early exit: the time taken does not tell which token (or how much of one) matched.
            if hmac.compare_digest(candidate, token.secret) and found is None:
                found = token.name
        return found


# --------------------------------------------------------------------------------------------
# Authentication


@dataclass(frozen=True)
class Identity:
    """Who called: `kind` is token or certificate, `name` is safe to log."""

    kind: str
    name: str


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == AUTHORIZATION:
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            if text[: len(BEARER)].lower() == BEARER:
                return text[len(BEARER) :].strip()
            return ""  # present but not a bearer token: counted as a wrong token
    return None


def certificate_identities(auth_context: Mapping[str, Iterable[bytes]] | None) -> list[str]:
    """Common name and SANs of a verified client certificate (empty without one)."""
    if not auth_context:
        return []
    names: list[str] = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth_context.get(key, ()) or ():
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            if text and text not in names:
                names.append(text)
    return names


class Authenticator:
    """Decides whether the caller of a protected method is who it must be."""

    def __init__(self, tokens: TokenSet, client_identities: Iterable[str] = (), mtls: bool = False) -> None:
        self.tokens = tokens
        self.client_identities = frozenset(i.strip() for i in client_identities if i.strip())
        self.mtls = mtls

    @classmethod
    def from_settings(cls, settings: Any) -> "Authenticator":
        tokens = TokenSet(settings.auth_tokens, settings.auth_tokens_file.strip())
        mtls = bool(settings.tls_require_client_cert)
        identities = tuple(settings.auth_client_identities)
        if identities and not mtls:
            raise SettingsError(
                f"{env_name('auth_client_identities')}: certificates identify callers only under mTLS; set {env_name('tls_require_client_cert')}=true"
            )
        if settings.auth_required and not len(tokens) and not identities:
            raise SettingsError(
                f"{env_name('auth_required')}: true, but nothing can authenticate: set {env_name('auth_tokens')}, "
                f"{env_name('auth_tokens_file')} or (under mTLS) {env_name('auth_client_identities')}"
            )
        return cls(tokens, identities, mtls)

    def authenticate(self, metadata, auth_context) -> Identity:
        presented = bearer_token(metadata)
        if presented:
            name = self.tokens.match(presented)
            if name is not None:
                return Identity("token", name)
        certified = certificate_identities(auth_context) if self.mtls else []
        if certified and self.client_identities:
            for candidate in certified:
                if candidate in self.client_identities:
                    return Identity("certificate", candidate)
            if ANY_IDENTITY in self.client_identities:
                return Identity("certificate", certified[0])
        if presented is not None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, INVALID_TOKEN, "the bearer token is not accepted")
        if certified and self.client_identities:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, IDENTITY_REFUSED, f"client certificate {certified[0][:80]!r} is not accepted for this method")
        raise Refused(
            grpc.StatusCode.UNAUTHENTICATED,
            MISSING,
            "credentials required: send 'authorization: Bearer <token>' metadata" + (" or an accepted client certificate" if self.client_identities else ""),
        )


def _wrap(behaviour: Callable, check: Callable[[grpc.ServicerContext], None], streaming_response: bool) -> Callable:
    if streaming_response:

        def stream(request_or_iterator, context):
            check(context)
            yield from behaviour(request_or_iterator, context)

        return stream

    def unary(request_or_iterator, context):
        check(context)
        return behaviour(request_or_iterator, context)

    return unary


class AuthInterceptor(grpc.ServerInterceptor):
    """Requires credentials for the methods in `protected` (full names); every other call passes untouched.

    `protect_all` extends the requirement to every method except health and reflection.
    """

    def __init__(self, authenticator: Authenticator, protected: Iterable[str], metrics=None, protect_all: bool = False) -> None:
        self.authenticator = authenticator
        self.protected = frozenset(protected)
        self.protect_all = protect_all
        self.refused = metrics.counter("auth_refused_total", "Calls refused for missing or wrong credentials", ["method", "reason"]) if metrics else None
        self.accepted = metrics.counter("auth_accepted_total", "Protected calls with accepted credentials", ["method", "kind"]) if metrics else None

    def protects(self, method: str) -> bool:
        if method in self.protected:
            return True
        service = method.lstrip("/").rsplit("/", 1)[0]
        return self.protect_all and service not in ALWAYS_OPEN_SERVICES

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.protects(method):
            return handler
        short = method.rsplit("/", 1)[-1]

        def check(context: grpc.ServicerContext) -> None:
            try:
                identity = self.authenticator.authenticate(context.invocation_metadata(), context.auth_context())
            except Refused as refusal:
                if self.refused is not None:
                    self.refused.labels(method=short, reason=refusal.reason).inc()
                log.warning("call refused", extra={"method": short, "reason": refusal.reason, "peer": context.peer()})
                context.abort(refusal.code, f"{short}: {refusal.message}")
            if self.accepted is not None:
                self.accepted.labels(method=short, kind=identity.kind).inc()
            # The audit trail of state changes: who (by token name or certificate), what, from where.
            log.info("call authorized", extra={"method": short, "identity": identity.name, "via": identity.kind, "peer": context.peer()})

        kinds = (
            ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
            ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
            ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
            ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
        )
        for attribute, factory, streams in kinds:
            behaviour = getattr(handler, attribute)
            if behaviour is not None:
                return factory(
                    _wrap(behaviour, check, streams),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler


class ServerSecurity:
    """What a service's gRPC server needs: credentials for its port and the auth interceptor."""

    def __init__(self, settings: Any, protected: Iterable[str] = PROTECTED_METHODS) -> None:
        self.tls = TlsFiles.from_settings(settings)
        self.auth_required = bool(settings.auth_required)
        self.authenticator = Authenticator.from_settings(settings) if self.auth_required else None
        self.protected = frozenset(protected)
        self.protect_all = settings.auth_protect == "all"
        if not self.auth_required and (settings.auth_tokens or settings.auth_tokens_file):
            log.warning("tokens are configured but not enforced", extra={"hint": f"set {env_name('auth_required')}=true"})
        if self.auth_required and self.tls is None and settings.grpc_host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("bearer tokens travel in clear text", extra={"hint": f"set {env_name('tls_cert')} and {env_name('tls_key')}"})

    def interceptors(self, metrics=None) -> list[grpc.ServerInterceptor]:
        if self.authenticator is None:
            return []
        return [AuthInterceptor(self.authenticator, self.protected, metrics, self.protect_all)]

    def add_port(self, server: grpc.Server, address: str) -> int:
        if self.tls is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, server_credentials(self.tls))

    def describe(self) -> str:
        transport = "plaintext" if self.tls is None else ("mtls" if self.tls.require_client_cert else "tls")
        return f"{transport}, auth {'required for ' + ('every RPC' if self.protect_all else 'mutating RPCs') if self.auth_required else 'off'}"


# --------------------------------------------------------------------------------------------
# Client side


@dataclass(frozen=True)
class ClientSettings:
    """What a caller (the CLI, a test, a service calling another) needs; the same IEX_* names as the servers'."""

    tls_ca: str = setting("", help="PEM CA bundle that signed the servers' certificates; TLS on when set")
    tls_cert: str = setting("", help="client certificate presented under mTLS")
    tls_key: str = setting("", help="private key of IEX_TLS_CERT")
    tls_server_name: str = setting("", help="name expected in server certificates (default: the host of the address)")
    auth_token: str = setting("", help="bearer token sent with every call", secret=True)


def client_settings(environ: Mapping[str, str] | None = None) -> ClientSettings:
    return settings_mod.load(ClientSettings, environ)


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor
):
    def __init__(self, token: str) -> None:
        self._header = (AUTHORIZATION, f"Bearer {token}")

    def _details(self, details):
        metadata = [m for m in (details.metadata or ()) if m[0].lower() != AUTHORIZATION] + [self._header]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials, getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: list
    credentials: Any
    wait_for_ready: Any
    compression: Any


def client_channel(address: str, config: Any | None = None, *, options: list | None = None) -> grpc.Channel:
    """A channel to `address` secured as `config` says (ClientSettings, or a service's settings).

    TLS when config.tls_ca is set (client certificate too when tls_cert/tls_key are); the bearer
    token config.auth_token, when set, goes with every call.
    """
    config = config if config is not None else client_settings()
    options = list(options or [])
    ca = getattr(config, "tls_ca", "").strip()
    if ca:
        cert, key = getattr(config, "tls_cert", "").strip(), getattr(config, "tls_key", "").strip()
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read_file(ca, env_name("tls_ca")),
            private_key=_read_file(key, env_name("tls_key")) if cert and key else None,
            certificate_chain=_read_file(cert, env_name("tls_cert")) if cert and key else None,
        )
        server_name = getattr(config, "tls_server_name", "").strip()
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    token = getattr(config, "auth_token", "")
    if token:
        channel = grpc.intercept_channel(channel, _TokenInterceptor(token))
    return channel
