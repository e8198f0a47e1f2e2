"""Google Cloud Storage access: the client, and one paragraph naming the fix when a gs:// path cannot be used.

The program checks every gs:// path it is given before it starts (check_bucket), so that a missing package, missing
credentials or a missing bucket is reported at once rather than from deep inside TensorFlow, orbax or tensorstore
(which would retry for minutes first).
"""

from __future__ import annotations

import os

CLOUD_PREFIX = 'gs://'
CHECK_SECONDS = 30.0  # how long check_bucket retries an unreachable Cloud Storage (the client's default: 120 s)
# How the program finds credentials, for the messages.
CREDENTIALS_HELP = (
    'On a workstation run `gcloud auth application-default login`; on a Cloud TPU or GCE VM give the VM a service '
    'account that may use the bucket; elsewhere set GOOGLE_APPLICATION_CREDENTIALS to a service account key file. '
    'For a local emulator set STORAGE_EMULATOR_HOST (see docs/cloud_storage.md).')


def is_cloud(path: str | os.PathLike) -> bool:
  return os.fspath(path).startswith(CLOUD_PREFIX)


def split_url(url: str) -> tuple[str, str]:
  """gs://bucket/a/b -> ('bucket', 'a/b')."""
  bucket, _, name = url[len(CLOUD_PREFIX):].partition('/')
  return bucket, name.strip('/')


class CloudStorageError(RuntimeError):
  """A gs:// path cannot be used (package, credentials, bucket, permission); the message says how to fix it."""


def storage_client():
  """A google.cloud.storage.Client with the default credentials (anonymous against STORAGE_EMULATOR_HOST)."""
  try:
    from google.cloud import storage as gcs  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise CloudStorageError(
        'gs:// paths need the google-cloud-storage package, which is not installed in this Python environment: '
        'pip install -r requirements.txt (it pins the version this program is tested with).') from None
  from google.auth import exceptions as auth_errors  # pylint: disable=import-outside-toplevel

  try:
    return gcs.Client()
  except auth_errors.DefaultCredentialsError:
    raise CloudStorageError(f'No Google Cloud credentials were found for the gs:// paths. {CREDENTIALS_HELP}') from None


def check_bucket(url: str, what: str) -> None:
  """Raises CloudStorageError unless the bucket of the gs:// URL `url` (given as `what`, e.g. '--workdir') exists and
  these credentials may read it. Local paths pass unchecked."""
  if not is_cloud(url):
    return
  bucket, _ = split_url(url)
  client = storage_client()  # first: it reports a missing package
  # pylint: disable=import-outside-toplevel  # installed with google-cloud-storage
  from google.api_core import exceptions as api_errors
  from google.auth import exceptions as auth_errors
  from google.cloud.storage import retry

  try:
    client.get_bucket(bucket, timeout=10, retry=retry.DEFAULT_RETRY.with_timeout(CHECK_SECONDS))
  except api_errors.NotFound:
    raise CloudStorageError(
        f'{what}={url}: the bucket gs://{bucket} does not exist. Create it in the region of the machines that '
        f'train (`gcloud storage buckets create gs://{bucket} --location=REGION`), or fix the name.') from None
  except api_errors.Forbidden as error:
    raise CloudStorageError(
        f'{what}={url}: these credentials may not use the bucket gs://{bucket} ({error.message}). Grant the '
        'account the Storage Object User role and storage.buckets.get on it (orbax reads the bucket\'s settings), '
        f'or use other credentials. {CREDENTIALS_HELP}') from None
  except (auth_errors.GoogleAuthError, api_errors.Unauthorized) as error:
    raise CloudStorageError(
        f'{what}={url}: the Google Cloud credentials were refused ({_one_line(error)}). {CREDENTIALS_HELP}') from None
  except Exception as error:  # pylint: disable=broad-except  # no network, a proxy, a server error after retries
    raise CloudStorageError(
        f'{what}={url}: Cloud Storage could not be reached ({_one_line(error)}). Check the network of this machine '
        '(a Cloud TPU VM reaches storage.googleapis.com directly) and run the command again.') from None


def check_buckets(*named_paths: tuple[str, str | None]) -> None:
  """check_bucket for each (what, path) given, where path is set: a run reports an unusable gs:// path (no package,
  credentials or bucket) before anything starts."""
  for what, path in named_paths:
    if path:
      check_bucket(path, what)


def _one_line(error: BaseException) -> str:
  return f'{type(error).__name__}: {" ".join(str(error).split())[:300]}'
