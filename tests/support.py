"""Test helpers: a domain stack on memory storage, fake tunnel connections,
and a small real-HTTP client for resources served on port 0."""

import base64
import io
import json

from twisted.internet import defer, reactor, task
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.server import Site
from zope.interface import implementer

from exposr.accounts import AccountService
from exposr.config import Config
from exposr.connections import ConnectionRegistry, new_connection_id
from exposr.interfaces import ITunnelConnection
from exposr.storage.memory import MemoryStorage
from exposr.tunnels import TunnelService

NODE_ID = "a" * 40


def make_config(**overrides):
    overrides.setdefault("ingress_http_url", "http://localhost:8080")
    return Config(**overrides)


class Stack:
    """Storage, accounts, tunnels and the registry on a `Clock`."""

    def __init__(self, config=None, clock=None, altnames=None, sni_url_for=None, storage=None):
        self.config = config if config is not None else make_config()
        self.clock = clock if clock is not None else task.Clock()
        if self.clock.seconds() == 0:
            self.clock.advance(1707560000.123)
        self.storage = storage if storage is not None else MemoryStorage(self.clock)
        self.accounts = AccountService(self.storage, self.clock)
        self.registry = ConnectionRegistry(self.config, NODE_ID, self.clock)
        self.tunnels = TunnelService(
            self.config, self.storage, self.accounts, self.registry, self.clock,
            altnames=altnames, sni_url_for=sni_url_for,
        )

    def open(self):
        return self.storage.open()

    @defer.inlineCallbacks
    def account_and_tunnel(self, tunnel_id="my-tunnel"):
        account = yield self.accounts.create()
        tunnel = yield self.tunnels.create(tunnel_id, account["id"])
        return account, tunnel


@implementer(ITunnelConnection)
class FakeConnection:
    """A local tunnel connection that records what is asked of it."""

    local = True

    def __init__(self, tunnel_id, peer="127.0.0.1", connection_id=None, registry=None):
        self.tunnel_id = tunnel_id
        self.peer = peer
        self.connection_id = connection_id or new_connection_id(NODE_ID)
        self.registry = registry
        self.disconnected = []
        self.streams = []

    def open_stream(self, protocolFactory):
        self.streams.append(protocolFactory)
        return defer.succeed(None)

    def disconnect(self, reason=None):
        self.disconnected.append(reason)
        if self.registry is not None:
            self.registry.unregister(self)


class FailingStorage:
    """Wraps a storage; every call fails with ``error`` while ``failing``."""

    def __init__(self, inner, error):
        self.inner = inner
        self.error = error
        self.failing = False

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr) or name in ("open", "close"):
            return attr

        def call(*args, **kwargs):
            if self.failing:
                return defer.fail(self.error)
            return attr(*args, **kwargs)

        return call


# -- HTTP ------------------------------------------------------------------------


class Response:
    def __init__(self, code, headers, body):
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name):
        values = self.headers.getRawHeaders(name.encode("ascii"))
        return values[0].decode("latin-1") if values else None

    @property
    def content_type(self):
        return self.header("content-type")

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return "<Response %d %r>" % (self.code, self.body[:200])


class HTTPServer:
    """Serve a resource on 127.0.0.1:0; `request` talks to it over real TCP."""

    def __init__(self, testcase, resource):
        self.port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.agent = Agent(reactor, pool=self.pool)
        testcase.addCleanup(self.close)

    @property
    def base(self):
        return "http://127.0.0.1:%d" % (self.port.getHost().port,)

    @defer.inlineCallbacks
    def close(self):
        yield self.pool.closeCachedConnections()
        yield self.port.stopListening()
        # let the server side see the connections go
        yield task.deferLater(reactor, 0, lambda: None)

    @defer.inlineCallbacks
    def request(self, method, path, body=None, headers=None, json_body=None, token=None):
        hdrs = Headers()
        for name, value in (headers or {}).items():
            hdrs.addRawHeader(name, value)
        if json_body is not None:
            body = json.dumps(json_body).encode("utf-8")
            if not hdrs.hasHeader("content-type"):
                hdrs.addRawHeader("content-type", "application/json")
        if token is not None:
            hdrs.addRawHeader("authorization", "Bearer " + token)
        if isinstance(body, str):
            body = body.encode("utf-8")
        producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
        response = yield self.agent.request(
            method.encode("ascii"), (self.base + path).encode("ascii"), hdrs, producer
        )
        data = yield readBody(response)
        return Response(response.code, response.headers, data)


def bearer(account_id):
    return base64.b64encode(account_id.encode("ascii")).decode("ascii")


JSON = "application/json; charset=utf-8"
TEXT = "text/plain; charset=utf-8"


class ResponseAssertions:
    """Mixin for TestCases checking `HTTPServer` responses: status, content type, body."""

    def assertJSON(self, response, code, body):
        self.assertEqual(response.code, code, response)
        self.assertEqual(response.content_type, JSON)
        if isinstance(body, str):
            self.assertEqual(response.body.decode("utf-8"), body)
        else:
            self.assertEqual(response.json(), body)

    def assertText(self, response, code, text):
        self.assertEqual(response.code, code, response)
        self.assertEqual(response.content_type, TEXT)
        self.assertEqual(response.body, text.encode("ascii"))
