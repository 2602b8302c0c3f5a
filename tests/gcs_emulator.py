"""Local GCS for tests: gcp-storage-emulator (patched) + a TLS proxy so TF's hard-wired
https://{www,storage}.googleapis.com client reaches it too.

Run it as a child process (see conftest.py). In-process use (start()) works for epath/gcsfs/
tensorstore/orbax, but NOT together with TF in the same process: some TF C++ calls (e.g.
TFRecordWriter.close) hold the GIL during network I/O, so an emulator thread deadlocks.

As a script: prints one JSON line {"port", "proxy_port", "cert"} when ready, then serves until
SIGTERM/SIGINT or until its stdin is closed (so it also dies if the parent is killed).

Test-side patches to gcp-storage-emulator 2026.7.19 (applied once, on import):
  * POST .../o/{src}/moveTo/o/{dst}: gcsfs >= 2025 renames with it; unimplemented (501) gcsfs
    retried 6x with backoff (~30 s per rename) before falling back to copy+delete.
  * GET .../b/{bucket}/storageLayout -> "no HNS": TF's directory rename asks first (else 404).
  * bodies sent with both `Transfer-Encoding: chunked` and `Content-Length` (TF's libcurl) are
    de-chunked; the emulator trusted Content-Length and stored "5\r\nhe" for "hello".
  * empty media uploads (TF's `dir/` marker objects) no longer crash the handler (TF retried).
  * `Expect: 100-continue` is answered (libcurl otherwise waits 1 s on some uploads).
  * BrokenPipe/ConnectionReset tracebacks from clients closing early are not printed.
  * media downloads carry x-goog-generation: without it tensorstore derives a bogus generation
    and the next OCDBT manifest write fails with "Malformed StorageGeneration" (flaky orbax).
  * ifGenerationMatch is enforced (412) on uploads and deletes; the stock emulator ignores it,
    so create-if-absent (ifGenerationMatch=0) silently overwrote.
  * resumable-upload Location keeps https:// when reached through the TLS proxy.
"""
import functools, logging, socket
from http import HTTPStatus
from gcp_storage_emulator import server as _gse
from gcp_storage_emulator.handlers import objects as _objs
from gcp_storage_emulator.exceptions import NotFound

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def _move(request, response, storage, *a, **k):
    p = request.params
    try:
        dest = _objs._copy(request.base_url, storage, p["bucket_name"], p["object_id"],
                           p["bucket_name"], p["dest_object_id"])
        storage.delete_file(p["bucket_name"], p["object_id"])
        response.json(dest)
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND

def _read_raw_data(h):
    te = (h.headers.get("Transfer-Encoding") or "").lower()
    if te == "chunked":
        raw = b""
        while True:
            line = h.rfile.readline().strip()
            n = int(line.split(b";")[0], 16) if line else 0
            if n == 0:
                while h.rfile.readline().strip():  # trailers
                    pass
                return raw
            raw += h.rfile.read(n)
            h.rfile.readline()
    n = h.headers.get("Content-Length")
    return h.rfile.read(int(n)) if n else None

def _with_empty_body(fn):
    @functools.wraps(fn)
    def wrapped(request, response, storage, *a, **k):
        if request.data is None:
            request._data = b""
        return fn(request, response, storage, *a, **k)
    return wrapped

def _https_location(fn):
    @functools.wraps(fn)
    def wrapped(request, response, storage, *a, **k):
        fn(request, response, storage, *a, **k)
        loc = response._headers.get("Location")
        if loc and loc.startswith("http://") and loc.split("/")[2].endswith(".googleapis.com"):
            response["Location"] = "https://" + loc[len("http://"):]
    return wrapped

class _Handler(_gse.RequestHandler):
    def parse_request(self):
        # HTTP/1.0 handlers never send "100 Continue"; libcurl (TF) then waits 1 s before
        # sending some request bodies (orbax save/rmtree via TF backend: 6 s -> 38 s).
        ok = super().parse_request()
        if ok and (self.headers.get("Expect") or "").lower() == "100-continue" \
                and self.request_version >= "HTTP/1.1":
            self.send_response_only(HTTPStatus.CONTINUE)
            self.end_headers()
            self.wfile.flush()
        return ok

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass  # client closed early (range reads); keep stderr quiet

def _with_generation_headers(fn):
    # Media downloads lack x-goog-generation; tensorstore then derives a bogus generation and
    # its next conditional write (OCDBT manifest) fails with "Malformed StorageGeneration".
    @functools.wraps(fn)
    def wrapped(request, response, storage, *a, **k):
        fn(request, response, storage, *a, **k)
        if response.status == HTTPStatus.OK or response.status == HTTPStatus.PARTIAL_CONTENT:
            try:
                obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            except NotFound:
                return
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
            response["x-goog-stored-content-length"] = str(obj.get("size", ""))
    return wrapped


def _patch_generation_headers():
    if getattr(_objs, "_gen_patched", False):
        return
    _objs.download = _with_generation_headers(_objs.download)  # objects.get() calls it for alt=media
    _gse.HANDLERS = tuple((r, {m: (_objs.download if f.__name__ == "download" else f)
                               for m, f in h.items()}) for r, h in _gse.HANDLERS)
    _objs._gen_patched = True


def _object_name(request, storage):
    q, p = request.query, request.params
    if "upload_id" in q:
        return storage.get_resumable_file_obj(q["upload_id"][0])["name"]
    if "name" in q:
        return q["name"][0]
    if p.get("object_id"):
        return p["object_id"]
    data = request.data
    if isinstance(data, dict):
        return (data.get("meta") or data).get("name")
    return None


def _with_generation_precondition(fn):
    # The emulator ignores ifGenerationMatch; real GCS answers 412 when it does not hold.
    # ifGenerationMatch=0 means "only if the object does not exist" (create-if-absent).
    @functools.wraps(fn)
    def wrapped(request, response, storage, *a, **k):
        want = request.query.get("ifGenerationMatch", [None])[0]
        if want is not None:
            try:
                name = _object_name(request, storage)
                cur = str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
            except NotFound:
                cur = "0"
            if cur != str(want):
                msg = "At least one of the pre-conditions you specified did not hold."
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": msg,
                                         "errors": [{"reason": "conditionNotMet", "message": msg}]}})
                return None
        return fn(request, response, storage, *a, **k)
    return wrapped


def _patch_preconditions():
    if getattr(_objs, "_pre_patched", False):
        return
    names = ("insert", "upload_partial", "xml_upload", "delete")
    for n in names:
        setattr(_objs, n, _with_generation_precondition(getattr(_objs, n)))
    # HANDLERS hold direct references: rebind by original function name
    new = []
    for r, h in _gse.HANDLERS:
        new.append((r, {m: (getattr(_objs, f.__name__) if f.__name__ in names else f) for m, f in h.items()}))
    _gse.HANDLERS = tuple(new)
    _objs._pre_patched = True


def _storage_layout(request, response, storage, *a, **k):
    # TF's GCS rename of a directory first GETs .../b/{bucket}/storageLayout (HNS check);
    # unimplemented, it fell through to the public-download route and 404'd.
    name = request.params["bucket_name"]
    if storage.get_bucket(name) is None:
        response.status = HTTPStatus.NOT_FOUND
        return
    response.json({"kind": "storage#storageLayout", "bucket": name, "location": "US",
                   "locationType": "multi-region", "hierarchicalNamespace": {"enabled": False}})


_LAYOUT_RE = r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/storageLayout$"
_MOVE_RE = (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
            r"/moveTo/o/(?P<dest_object_id>.*[^/]+)$")

def _patch():
    if getattr(_gse, "_test_patched", False):
        return
    _gse.HANDLERS = ((_MOVE_RE, {"POST": _move}), (_LAYOUT_RE, {"GET": _storage_layout})) + tuple(_gse.HANDLERS)
    _gse._read_raw_data = _read_raw_data
    _objs._media_upload = _with_empty_body(_objs._media_upload)
    _objs.xml_upload = _with_empty_body(_objs.xml_upload)
    # HANDLERS captured xml_upload by reference: rebind it
    _gse.HANDLERS = tuple((r, {m: (_objs.xml_upload if f.__name__ == "xml_upload" else f)
                               for m, f in h.items()}) for r, h in _gse.HANDLERS)
    _objs._create_resumable_upload = _https_location(_objs._create_resumable_upload)
    _patch_generation_headers()
    _patch_preconditions()
    _gse.RequestHandler = _Handler  # used by APIThread.run via module global
    _gse._test_patched = True
    for name in ("gcp_storage_emulator", "api.object", "api.bucket"):
        logging.getLogger(name).setLevel(logging.CRITICAL)

_patch()

# ---------------------------------------------------------------- TLS proxy (TF only)
import datetime, json, os, ssl, sys, tempfile, threading, signal, argparse

_PROXY_HOSTS = ("www.googleapis.com", "storage.googleapis.com")


def _make_cert(dirname):
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gcs-emulator-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in _PROXY_HOSTS]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cp, kp = os.path.join(dirname, "cert.pem"), os.path.join(dirname, "key.pem")
    with open(cp, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(kp, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cp, kp


def _pipe(src, dst):
    try:
        while True:
            b = src.recv(65536)
            if not b:
                break
            dst.sendall(b)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class TlsProxy:
    """CONNECT proxy for *.googleapis.com:443 that terminates TLS and pipes to the emulator."""

    def __init__(self, upstream_port, dirname):
        self.upstream = ("127.0.0.1", upstream_port)
        self.cert, key = _make_cert(dirname)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(self.cert, key)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c):
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                b = c.recv(4096)
                if not b:
                    c.close()
                    return
                head += b
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            if method != "CONNECT" or target.split(":")[0] not in _PROXY_HOSTS:
                c.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                c.close()
                return
            c.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            tls = self.ctx.wrap_socket(c, server_side=True)
            up = socket.create_connection(self.upstream)
            threading.Thread(target=_pipe, args=(up, tls), daemon=True).start()
            _pipe(tls, up)
        except Exception:
            try:
                c.close()
            except OSError:
                pass

    def close(self):
        self.sock.close()


def start(buckets=("bucket",)):
    """In-process start (no TF!). Returns (server, port); call server.stop()."""
    port = free_port()
    srv = _gse.create_server("127.0.0.1", port, in_memory=True, default_bucket=buckets[0])
    for b in buckets[1:]:
        from gcp_storage_emulator.handlers import buckets as _b
        _b.create_bucket(b, srv._storage)
    srv._api.daemon = True  # APIThread is non-daemon: a missed stop() would hang interpreter exit
    srv.start()
    return srv, port


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bucket", action="append", default=[])
    ap.add_argument("--tf-proxy", action="store_true")
    ap.add_argument("--cert-dir", default=None)
    a = ap.parse_args()
    srv, port = start(tuple(a.bucket or ["bucket"]))
    info = {"port": port}
    px = None
    if a.tf_proxy:
        px = TlsProxy(port, a.cert_dir or tempfile.mkdtemp())
        info.update(proxy_port=px.port, cert=px.cert)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    print(json.dumps(info), flush=True)
    done.wait()
    if px:
        px.close()
    srv.stop()


if __name__ == "__main__":
    main()
