"""AWS CLI v2 against a real `hearth serve`, and function code from S3Bucket/S3Key.

AWS CLI v2 is Debian's `awscli` package (/usr/bin/aws, installed by .ci/setup): PyPI has only v1,
which lacks `--cli-binary-format`. It runs with its own empty config and credentials files, so
nothing of this machine's ~/.aws is read.

S3 code comes from the server's local object store (`<data-dir>/objects`, a bucket is a folder) and
from a real S3-compatible server, moto's `moto_server` (pinned in requirements.txt), through a
second `hearth serve --s3-endpoint`.
"""

import base64
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from conftest import KEY, REGION, ROLE, SECRET, Server, serve_command

AWS_V2 = Path("/usr/bin/aws")
VENV_BIN = Path(sys.executable).parent


def make_zip(text):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        info = zipfile.ZipInfo("bootstrap")
        info.external_attr = 0o755 << 16
        z.writestr(info, text)
    return buf.getvalue()


def sha_b64(data):
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def wait_active(client, name):
    client.get_waiter("function_active_v2").wait(FunctionName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 30})


def error_of(excinfo):
    err = excinfo.value.response
    return err["Error"]["Code"], err["ResponseMetadata"]["HTTPStatusCode"], err["Error"]["Message"]


@pytest.fixture(scope="module", autouse=True)
def remove_our_functions(server):
    """Leaves the shared server's function list as this module found it (other modules count it)."""
    yield
    c = server.client()
    for page in c.get_paginator("list_functions").paginate():
        for f in page["Functions"]:
            if f["FunctionName"].startswith(("cli-v2-", "py-s3-")):
                c.delete_function(FunctionName=f["FunctionName"])


# ---------------------------------------------------------------------------------------------
# AWS CLI v2


@pytest.fixture(scope="module")
def aws_v2(tmp_path_factory):
    """Runs `/usr/bin/aws lambda ...` (v2) against a server, isolated from ~/.aws."""
    if not AWS_V2.is_file():
        pytest.fail(f"{AWS_V2} is missing: AWS CLI v2 is Debian's awscli package (.ci/setup installs it)",
                    pytrace=False)
    home = tmp_path_factory.mktemp("aws-v2-home")
    config = home / "config"
    config.write_text(f"[default]\nregion = {REGION}\n")
    credentials = home / "credentials"
    credentials.write_text("")
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "AWS_CONFIG_FILE": str(config),
        "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_PAGER": "",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    version = subprocess.run([str(AWS_V2), "--version"], env=env, capture_output=True, text=True, timeout=60)
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("aws-cli/2."), f"{AWS_V2} is not AWS CLI v2: {version.stdout!r}"

    def run(server, *args):
        return subprocess.run(
            [str(AWS_V2), "lambda", *args, "--endpoint-url", server.endpoint, "--output", "json"],
            env=env, capture_output=True, text=True, timeout=120)

    return run


@pytest.fixture(scope="module")
def cli_fn(server):
    """A function with a shell bootstrap, for the control-plane calls."""
    c = server.client()
    code = make_zip("#!/bin/sh\necho v2\n")
    c.create_function(FunctionName="cli-v2-fn", Runtime="provided.al2023", Role=ROLE, Handler="bootstrap",
                      Code={"ZipFile": code})
    wait_active(c, "cli-v2-fn")
    return "cli-v2-fn", code


def test_cli_v2_control_plane(server, aws_v2, cli_fn):
    name, code = cli_fn
    out = aws_v2(server, "get-function", "--function-name", name)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["Configuration"]["FunctionName"] == name
    assert got["Configuration"]["CodeSha256"] == sha_b64(code)
    assert got["Configuration"]["State"] == "Active"
    # v2 follows NextMarker itself, one function a page.
    out = aws_v2(server, "list-functions", "--page-size", "1")
    assert out.returncode == 0, out.stderr
    assert name in [f["FunctionName"] for f in json.loads(out.stdout)["Functions"]]
    out = aws_v2(server, "get-function", "--function-name", "cli-v2-missing")
    assert out.returncode == 254 and "ResourceNotFoundException" in out.stderr, out.stderr


def test_cli_v2_signature_is_checked(server, aws_v2, cli_fn, tmp_path):
    """v2's requests are SigV4-verified: a wrong secret is refused, so the ones above were checked."""
    name, _ = cli_fn
    bad = subprocess.run(
        [str(AWS_V2), "lambda", "get-function", "--function-name", name, "--endpoint-url", server.endpoint],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "AWS_CONFIG_FILE": str(tmp_path / "none"),
             "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_ACCESS_KEY_ID": KEY,
             "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_DEFAULT_REGION": REGION, "AWS_MAX_ATTEMPTS": "1"},
        capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "InvalidSignatureException" in bad.stderr, bad.stderr


def test_cli_v2_dry_run_with_raw_in_base64_out(server, aws_v2, cli_fn, tmp_path):
    """v2 parses --cli-binary-format and its signed invoke (payload included) passes SigV4."""
    name, _ = cli_fn
    outfile = tmp_path / "dry.json"
    out = aws_v2(server, "invoke", "--function-name", name, "--invocation-type", "DryRun",
                 "--cli-binary-format", "raw-in-base64-out", "--payload", '{"hello": "dry"}', str(outfile))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["StatusCode"] == 204
    # Without the flag v2 base64-decodes --payload, and what reaches the server is not JSON.
    out = aws_v2(server, "invoke", "--function-name", name, "--invocation-type", "DryRun",
                 "--payload", '{"hello": "dry"}', str(tmp_path / "x.json"))
    assert out.returncode == 254 and "InvalidRequestContentException" in out.stderr, out.stderr


@pytest.fixture(scope="module")
def echo_fn(server, echo_zip):
    """The lambda_runtime echo function, created and Active."""
    c = server.client()
    code = Path(echo_zip).read_bytes()
    c.create_function(FunctionName="cli-v2-echo", Runtime="provided.al2023", Role=ROLE, Handler="bootstrap",
                      Code={"ZipFile": code}, Timeout=30)
    wait_active(c, "cli-v2-echo")
    return "cli-v2-echo"


def test_cli_v2_invoke_raw_in_base64_out(server, aws_v2, echo_fn, tmp_path):
    outfile = tmp_path / "out.json"
    payload = {"hello": "from aws cli v2", "n": [1, 2, 3]}
    out = aws_v2(server, "invoke", "--function-name", echo_fn, "--cli-binary-format", "raw-in-base64-out",
                 "--payload", json.dumps(payload), str(outfile))
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert printed["StatusCode"] == 200, printed
    assert printed["ExecutedVersion"] == "$LATEST"
    assert "FunctionError" not in printed
    assert json.loads(outfile.read_text()) == payload


# ---------------------------------------------------------------------------------------------
# S3Bucket/S3Key from the server's local object store (<data-dir>/objects)


def test_create_and_update_from_the_local_object_store(server):
    c = server.client()
    bucket = Path(server.data_dir) / "objects" / "py-code-bucket"
    (bucket / "fns").mkdir(parents=True, exist_ok=True)
    code = make_zip("#!/bin/sh\necho from the local store\n")
    (bucket / "fns" / "code.zip").write_bytes(code)
    cfg = c.create_function(FunctionName="py-s3-local", Runtime="provided.al2023", Role=ROLE, Handler="bootstrap",
                            Code={"S3Bucket": "py-code-bucket", "S3Key": "fns/code.zip"})
    assert cfg["ResponseMetadata"]["HTTPStatusCode"] == 201
    assert cfg["CodeSha256"] == sha_b64(code) and cfg["CodeSize"] == len(code)
    wait_active(c, "py-s3-local")
    got = c.get_function(FunctionName="py-s3-local")
    assert got["Configuration"]["CodeSha256"] == sha_b64(code)

    code2 = make_zip("#!/bin/sh\necho two\n")
    (bucket / "fns" / "two.zip").write_bytes(code2)
    upd = c.update_function_code(FunctionName="py-s3-local", S3Bucket="py-code-bucket", S3Key="fns/two.zip")
    assert upd["CodeSha256"] == sha_b64(code2)
    c.get_waiter("function_updated_v2").wait(FunctionName="py-s3-local", WaiterConfig={"Delay": 1, "MaxAttempts": 30})

    with pytest.raises(ClientError) as e:
        c.create_function(FunctionName="py-s3-missing", Runtime="provided.al2023", Role=ROLE, Handler="bootstrap",
                          Code={"S3Bucket": "py-code-bucket", "S3Key": "fns/absent.zip"})
    assert error_of(e) == (
        "InvalidParameterValueException", 400,
        "Error occurred while GetObject. S3 Error Code: NoSuchKey. S3 Error Message: The specified key does not exist.")
    with pytest.raises(ClientError) as e:
        c.create_function(FunctionName="py-s3-missing", Runtime="provided.al2023", Role=ROLE, Handler="bootstrap",
                          Code={"S3Bucket": "py-code-bucket", "S3Key": "../../metadata.redb"})
    assert error_of(e)[:2] == ("InvalidParameterValueException", 400)
    with pytest.raises(ClientError) as e:
        c.create_function(FunctionName="py-s3-missing", Runtime="provided.al2023", Role=ROLE, Handler="bootstrap",
                          Code={"S3Bucket": "py-code-bucket", "S3Key": "fns/code.zip", "S3ObjectVersion": "1"})
    code_, status, message = error_of(e)
    assert (code_, status) == ("InvalidParameterValueException", 400) and "S3ObjectVersion" in message


def test_cli_v2_creates_from_the_local_object_store(server, aws_v2):
    bucket = Path(server.data_dir) / "objects" / "py-cli-bucket"
    bucket.mkdir(parents=True, exist_ok=True)
    code = make_zip("#!/bin/sh\necho cli\n")
    (bucket / "cli.zip").write_bytes(code)
    out = aws_v2(server, "create-function", "--function-name", "py-s3-cli", "--runtime", "provided.al2023",
                 "--role", ROLE, "--handler", "bootstrap", "--code", "S3Bucket=py-cli-bucket,S3Key=cli.zip")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["CodeSha256"] == sha_b64(code)


# ---------------------------------------------------------------------------------------------
# S3Bucket/S3Key from a real S3-compatible server: moto_server, and `hearth serve --s3-endpoint`

S3_ENV = {"AWS_ACCESS_KEY_ID": "moto-key", "AWS_SECRET_ACCESS_KEY": "moto-secret", "AWS_REGION": REGION}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    moto_server = VENV_BIN / "moto_server"
    if not moto_server.is_file():
        pytest.fail(f"{moto_server} is missing: install api/tests/python/requirements.txt (.ci/setup)", pytrace=False)
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([str(moto_server), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto_server did not start; see {log.name}", pytrace=False)
            time.sleep(0.2)
    try:
        yield endpoint
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


class S3Server(Server):
    """A second `hearth serve`, reading S3Bucket/S3Key from an S3-compatible endpoint."""

    def __init__(self, data_dir, creds, s3_endpoint):
        super().__init__(data_dir, creds)
        self.s3_endpoint = s3_endpoint

    def start(self):
        cmd = serve_command() + [
            "--listen", "127.0.0.1:0",
            "--data-dir", str(self.data_dir),
            "--credentials", str(self.creds),
            "--s3-endpoint", self.s3_endpoint,
        ]
        env = dict(os.environ, **S3_ENV)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, env=env)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("hearth-api listening on "):
            self.proc.kill()
            pytest.fail(f"server did not start: {line!r}; see {self.log.name}", pytrace=False)
        self.endpoint = "http://" + line.split()[-1]


@pytest.fixture(scope="module")
def s3_server(moto, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hearth-s3")
    creds = tmp / "credentials"
    creds.write_text(f"{KEY} {SECRET}\n")
    srv = S3Server(tmp / "data", creds, moto)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        srv.log.close()


def s3_client(endpoint):
    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                        config=Config(s3={"addressing_style": "path"}))


def test_code_from_an_s3_compatible_server(moto, s3_server):
    s3 = s3_client(moto)
    s3.create_bucket(Bucket="hearth-code")
    s3.put_bucket_versioning(Bucket="hearth-code", VersioningConfiguration={"Status": "Enabled"})
    v1 = make_zip("#!/bin/sh\necho s3 v1\n")
    v2 = make_zip("#!/bin/sh\necho s3 v2\n")
    first = s3.put_object(Bucket="hearth-code", Key="fns/echo.zip", Body=v1)["VersionId"]
    s3.put_object(Bucket="hearth-code", Key="fns/echo.zip", Body=v2)

    c = s3_server.client()
    cfg = c.create_function(FunctionName="py-s3-moto", Runtime="provided.al2023", Role=ROLE, Handler="bootstrap",
                            Code={"S3Bucket": "hearth-code", "S3Key": "fns/echo.zip"})
    assert cfg["CodeSha256"] == sha_b64(v2) and cfg["CodeSize"] == len(v2)
    wait_active(c, "py-s3-moto")
    assert c.get_function(FunctionName="py-s3-moto")["Configuration"]["CodeSha256"] == sha_b64(v2)

    # An older version of the object, by S3ObjectVersion.
    upd = c.update_function_code(FunctionName="py-s3-moto", S3Bucket="hearth-code", S3Key="fns/echo.zip",
                                 S3ObjectVersion=first)
    assert upd["CodeSha256"] == sha_b64(v1)
    c.get_waiter("function_updated_v2").wait(FunctionName="py-s3-moto", WaiterConfig={"Delay": 1, "MaxAttempts": 30})

    with pytest.raises(ClientError) as e:
        c.create_function(FunctionName="py-s3-moto-2", Runtime="provided.al2023", Role=ROLE, Handler="bootstrap",
                          Code={"S3Bucket": "hearth-code", "S3Key": "fns/absent.zip"})
    assert error_of(e) == (
        "InvalidParameterValueException", 400,
        "Error occurred while GetObject. S3 Error Code: NoSuchKey. S3 Error Message: The specified key does not exist.")
    with pytest.raises(ClientError) as e:
        c.create_function(FunctionName="py-s3-moto-2", Runtime="provided.al2023", Role=ROLE, Handler="bootstrap",
                          Code={"S3Bucket": "no-such-bucket", "S3Key": "fns/echo.zip"})
    code, status, message = error_of(e)
    assert (code, status) == ("InvalidParameterValueException", 400) and "NoSuchBucket" in message, message
    names = [f["FunctionName"] for f in c.list_functions()["Functions"]]
    assert names == ["py-s3-moto"]
