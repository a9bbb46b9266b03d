"""The Lambda API through real clients (boto3, the AWS CLI) against a real server process.

Tests run in file order and share one server and its functions; one test restarts the server
mid-suite and checks that nothing was lost.
"""

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from conftest import KEY, ROLE, SECRET

FN = "py-fn"


def make_zip(text):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        info = zipfile.ZipInfo("bootstrap")
        info.external_attr = 0o755 << 16
        z.writestr(info, text)
    return buf.getvalue()


def sha_b64(data):
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def error_of(excinfo):
    err = excinfo.value.response
    return err["Error"]["Code"], err["ResponseMetadata"]["HTTPStatusCode"], err


def wait_config(client, name, waiter="function_updated_v2"):
    client.get_waiter(waiter).wait(FunctionName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 30})


def test_create_and_wait_active(server):
    c = server.client()
    code = make_zip("#!/bin/sh\necho one\n")
    cfg = c.create_function(
        FunctionName=FN, Runtime="provided.al2023", Role=ROLE, Handler="bootstrap", Code={"ZipFile": code}
    )
    assert cfg["ResponseMetadata"]["HTTPStatusCode"] == 201
    assert cfg["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]
    assert cfg["State"] == "Pending"
    assert cfg["Timeout"] == 3 and cfg["MemorySize"] == 128
    assert cfg["Architectures"] == ["x86_64"]
    assert cfg["CodeSha256"] == sha_b64(code) and cfg["CodeSize"] == len(code)
    assert cfg["FunctionArn"] == f"arn:aws:lambda:us-east-1:000000000000:function:{FN}"
    c.get_waiter("function_active_v2").wait(FunctionName=FN, WaiterConfig={"Delay": 1, "MaxAttempts": 30})
    c.get_waiter("function_active").wait(FunctionName=FN, WaiterConfig={"Delay": 1, "MaxAttempts": 30})
    got = c.get_function(FunctionName=FN)
    assert got["Configuration"]["State"] == "Active"
    assert got["Configuration"]["LastUpdateStatus"] == "Successful"
    assert got["Code"]["RepositoryType"] == "S3"


def test_get_by_partial_and_full_arn(server):
    c = server.client()
    for name in [FN, f"000000000000:function:{FN}", f"arn:aws:lambda:us-east-1:000000000000:function:{FN}"]:
        assert c.get_function_configuration(FunctionName=name)["FunctionName"] == FN


def test_list_functions_with_pagination(server):
    c = server.client()
    names = [f"py-page-{i}" for i in range(5)]
    for n in names:
        c.create_function(FunctionName=n, Runtime="provided.al2023", Role=ROLE, Handler="bootstrap",
                          Code={"ZipFile": make_zip(n)})
    seen = []
    for page in c.get_paginator("list_functions").paginate(PaginationConfig={"PageSize": 2}):
        assert len(page["Functions"]) <= 2
        seen += [f["FunctionName"] for f in page["Functions"]]
    assert sorted(seen) == sorted(names + [FN])
    first = c.list_functions(MaxItems=3)
    assert len(first["Functions"]) == 3 and first["NextMarker"]
    rest = c.list_functions(Marker=first["NextMarker"], MaxItems=50)
    assert len(rest["Functions"]) == 3 and "NextMarker" not in rest


def test_update_configuration_and_code(server):
    c = server.client()
    cfg = c.update_function_configuration(FunctionName=FN, Timeout=10, MemorySize=256,
                                          Environment={"Variables": {"GREETING": "hello"}})
    assert cfg["LastUpdateStatus"] == "InProgress"
    wait_config(c, FN)
    wait_config(c, FN, "function_updated")
    got = c.get_function_configuration(FunctionName=FN)
    assert got["Timeout"] == 10 and got["MemorySize"] == 256
    assert got["Environment"]["Variables"] == {"GREETING": "hello"}
    code = make_zip("#!/bin/sh\necho two\n")
    up = c.update_function_code(FunctionName=FN, ZipFile=code)
    assert up["CodeSha256"] == sha_b64(code)
    wait_config(c, FN)


def test_revision_id_mismatch_is_412(server):
    c = server.client()
    with pytest.raises(ClientError) as e:
        c.update_function_configuration(FunctionName=FN, Description="x", RevisionId="not-the-revision")
    code, status, _ = error_of(e)
    assert (code, status) == ("PreconditionFailedException", 412)
    rev = c.get_function_configuration(FunctionName=FN)["RevisionId"]
    c.update_function_configuration(FunctionName=FN, Description="first", RevisionId=rev)
    wait_config(c, FN)


def test_publish_versions_and_weighted_alias(server):
    c = server.client()
    v1 = c.publish_version(FunctionName=FN)
    assert v1["Version"] == "1" and v1["ResponseMetadata"]["HTTPStatusCode"] == 201
    c.get_waiter("published_version_active").wait(FunctionName=FN, Qualifier="1",
                                                   WaiterConfig={"Delay": 1, "MaxAttempts": 10})
    c.update_function_configuration(FunctionName=FN, Description="second")
    wait_config(c, FN)
    v2 = c.publish_version(FunctionName=FN, Description="v2")
    assert v2["Version"] == "2"
    versions = [v["Version"] for v in c.list_versions_by_function(FunctionName=FN)["Versions"]]
    assert versions == ["$LATEST", "1", "2"]
    alias = c.create_alias(FunctionName=FN, Name="live", FunctionVersion="1",
                           RoutingConfig={"AdditionalVersionWeights": {"2": 0.3}})
    assert alias["AliasArn"].endswith(f":function:{FN}:live")
    assert alias["RoutingConfig"]["AdditionalVersionWeights"] == {"2": 0.3}
    got = c.get_alias(FunctionName=FN, Name="live")
    assert got["FunctionVersion"] == "1"
    with pytest.raises(ClientError) as e:
        c.update_alias(FunctionName=FN, Name="live", FunctionVersion="2", RevisionId="stale")
    assert error_of(e)[:2] == ("PreconditionFailedException", 412)
    up = c.update_alias(FunctionName=FN, Name="live", FunctionVersion="2", RevisionId=got["RevisionId"],
                        RoutingConfig={"AdditionalVersionWeights": {"1": 0.5}})
    assert up["FunctionVersion"] == "2"
    c.create_alias(FunctionName=FN, Name="stable", FunctionVersion="1")
    assert sorted(a["Name"] for a in c.list_aliases(FunctionName=FN)["Aliases"]) == ["live", "stable"]
    with pytest.raises(ClientError) as e:
        c.create_alias(FunctionName=FN, Name="stable", FunctionVersion="1")
    assert error_of(e)[:2] == ("ResourceConflictException", 409)
    # DryRun through an alias and a version: 204 and the executed version.
    r = c.invoke(FunctionName=FN, Qualifier="stable", InvocationType="DryRun", Payload=b"{}")
    assert r["StatusCode"] == 204
    assert r["ResponseMetadata"]["HTTPHeaders"]["x-amz-executed-version"] == "1"


def test_concurrency_and_throttle(server):
    c = server.client()
    assert "ReservedConcurrentExecutions" not in c.get_function_concurrency(FunctionName=FN)
    assert c.put_function_concurrency(FunctionName=FN, ReservedConcurrentExecutions=0)[
        "ReservedConcurrentExecutions"] == 0
    assert c.get_function_concurrency(FunctionName=FN)["ReservedConcurrentExecutions"] == 0
    assert c.get_function(FunctionName=FN)["Concurrency"]["ReservedConcurrentExecutions"] == 0
    with pytest.raises(ClientError) as e:
        c.invoke(FunctionName=FN, Payload=b"{}")
    code, status, err = error_of(e)
    assert (code, status) == ("TooManyRequestsException", 429)
    assert err["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
    assert err["ResponseMetadata"]["HTTPHeaders"]["retry-after"] == "1"
    c.put_function_concurrency(FunctionName=FN, ReservedConcurrentExecutions=7)
    settings = c.get_account_settings()
    assert settings["AccountLimit"]["UnreservedConcurrentExecutions"] == 993
    with pytest.raises(ClientError) as e:
        c.put_function_concurrency(FunctionName=FN, ReservedConcurrentExecutions=950)
    assert error_of(e)[:2] == ("InvalidParameterValueException", 400)


def test_event_invoke_config(server):
    c = server.client()
    put = c.put_function_event_invoke_config(
        FunctionName=FN, MaximumRetryAttempts=1, MaximumEventAgeInSeconds=3600,
        DestinationConfig={"OnFailure": {"Destination": "arn:aws:sqs:us-east-1:000000000000:dlq"}})
    assert put["FunctionArn"].endswith(f":function:{FN}:$LATEST")
    up = c.update_function_event_invoke_config(FunctionName=FN, MaximumRetryAttempts=0)
    assert up["MaximumRetryAttempts"] == 0 and up["MaximumEventAgeInSeconds"] == 3600
    c.put_function_event_invoke_config(FunctionName=FN, Qualifier="live", MaximumRetryAttempts=2)
    got = c.get_function_event_invoke_config(FunctionName=FN)
    assert got["DestinationConfig"]["OnFailure"]["Destination"].endswith(":dlq")
    assert len(c.list_function_event_invoke_configs(FunctionName=FN)["FunctionEventInvokeConfigs"]) == 2
    raw = server.client(validate=False)
    for bad in [{"MaximumRetryAttempts": 3}, {"MaximumEventAgeInSeconds": 59}, {"MaximumEventAgeInSeconds": 21601}]:
        with pytest.raises(ClientError) as e:
            raw.put_function_event_invoke_config(FunctionName=FN, **bad)
        assert error_of(e)[:2] == ("ValidationException", 400)
    c.delete_function_event_invoke_config(FunctionName=FN, Qualifier="live")
    with pytest.raises(ClientError) as e:
        c.get_function_event_invoke_config(FunctionName=FN, Qualifier="live")
    assert error_of(e)[:2] == ("ResourceNotFoundException", 404)


def test_error_shapes(server):
    c = server.client()
    with pytest.raises(ClientError) as e:
        c.get_function(FunctionName="does-not-exist")
    code, status, err = error_of(e)
    assert (code, status) == ("ResourceNotFoundException", 404)
    assert "Function not found" in err["Error"]["Message"]
    with pytest.raises(ClientError) as e:
        c.create_function(FunctionName=FN, Runtime="provided.al2023", Role=ROLE, Handler="bootstrap",
                          Code={"ZipFile": make_zip("x")})
    assert error_of(e)[:2] == ("ResourceConflictException", 409)
    with pytest.raises(ClientError) as e:
        c.create_function(FunctionName="py-badzip", Runtime="provided.al2023", Role=ROLE, Handler="bootstrap",
                          Code={"ZipFile": b"not a zip"})
    assert error_of(e)[:2] == ("InvalidParameterValueException", 400)
    raw = server.client(validate=False)
    with pytest.raises(ClientError) as e:
        raw.update_function_configuration(FunctionName=FN, Timeout=0)
    assert error_of(e)[:2] == ("ValidationException", 400)
    with pytest.raises(ClientError) as e:
        c.update_function_configuration(FunctionName=FN, Environment={"Variables": {"BIG": "x" * 5000}})
    assert error_of(e)[:2] == ("InvalidParameterValueException", 400)
    with pytest.raises(ClientError) as e:
        c.invoke(FunctionName=FN, Payload=b" " * (6 * 1024 * 1024 + 1))
    code, status, err = error_of(e)
    assert (code, status) == ("RequestEntityTooLargeException", 413)
    assert "6291456" in err["Error"]["Message"]
    with pytest.raises(ClientError) as e:
        c.invoke(FunctionName=FN, InvocationType="Event", Payload=b" " * (1024 * 1024 + 1))
    assert error_of(e)[:2] == ("RequestEntityTooLargeException", 413)
    # Far over the limit: still a clean 413, not a reset connection.
    with pytest.raises(ClientError) as e:
        c.invoke(FunctionName=FN, Payload=b" " * (20 * 1024 * 1024))
    assert error_of(e)[:2] == ("RequestEntityTooLargeException", 413)
    # A code zip over 50 MB (about 70 MB as base64 JSON).
    with pytest.raises(ClientError) as e:
        c.update_function_code(FunctionName=FN, ZipFile=os.urandom(53 * 1024 * 1024))
    code, status, err = error_of(e)
    assert (code, status) == ("RequestEntityTooLargeException", 413)
    assert "UpdateFunctionCode" in err["Error"]["Message"]


def test_signatures(server):
    with pytest.raises(ClientError) as e:
        server.client(secret="wrong-secret").list_functions()
    assert error_of(e)[:2] == ("InvalidSignatureException", 403)
    with pytest.raises(ClientError) as e:
        server.client(key="AKIDNOBODY").list_functions()
    assert error_of(e)[:2] == ("UnrecognizedClientException", 403)


def test_invoke_of_a_function_that_cannot_start_is_unhandled(server):
    """py-fn's bootstrap is a shell script and the sandbox has no shell: its init fails, and the
    invoke answers as Lambda does for an init failure (200, Unhandled, the error as the body)."""
    c = server.client()
    c.delete_function_concurrency(FunctionName=FN)
    r = c.invoke(FunctionName=FN, Payload=b'{"a": 1}')
    assert r["StatusCode"] == 200
    assert r["FunctionError"] == "Unhandled"
    body = json.loads(r["Payload"].read())
    assert body["errorType"].startswith("Runtime."), body


def aws_cli(server, *args):
    env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1",
               AWS_MAX_ATTEMPTS="1", AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")
    aws = Path(sys.executable).parent / "aws"
    return subprocess.run([str(aws), "lambda", *args, "--endpoint-url", server.endpoint, "--output", "json"],
                          env=env, capture_output=True, text=True, timeout=60)


def test_aws_cli(server, tmp_path):
    out = aws_cli(server, "get-function-configuration", "--function-name", FN)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["FunctionName"] == FN
    out = aws_cli(server, "list-functions", "--max-items", "2")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["Functions"]) == 2
    # awscli on PyPI is v1, which sends --payload as raw bytes (v2's
    # `--cli-binary-format raw-in-base64-out` does not exist there).
    out = aws_cli(server, "invoke", "--function-name", FN, "--invocation-type", "DryRun",
                  "--payload", '{"hello": "world"}', str(tmp_path / "out.json"))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["StatusCode"] == 204
    out = aws_cli(server, "get-function", "--function-name", "missing-fn")
    assert out.returncode != 0 and "ResourceNotFoundException" in out.stderr


def snapshot(c):
    return {
        "function": {k: v for k, v in c.get_function(FunctionName=FN).items() if k != "ResponseMetadata"},
        "versions": c.list_versions_by_function(FunctionName=FN)["Versions"],
        "aliases": c.list_aliases(FunctionName=FN)["Aliases"],
        "functions": sorted(f["FunctionName"] for f in c.list_functions()["Functions"]),
        "eic": c.list_function_event_invoke_configs(FunctionName=FN)["FunctionEventInvokeConfigs"],
        "concurrency": c.get_function_concurrency(FunctionName=FN).get("ReservedConcurrentExecutions"),
    }


def test_restart_loses_nothing(server):
    c = server.client()
    c.put_function_concurrency(FunctionName=FN, ReservedConcurrentExecutions=3)
    before = snapshot(c)
    old = server.endpoint
    server.restart()
    assert server.proc.poll() is None
    after = snapshot(server.client())
    before["function"]["Code"].pop("Location")
    after["function"]["Code"].pop("Location")
    assert after == before, f"restart of {old} changed the metadata"


def test_delete(server):
    c = server.client()
    with pytest.raises(ClientError) as e:
        c.delete_function(FunctionName=FN, Qualifier="1")
    assert error_of(e)[:2] == ("ResourceConflictException", 409)
    assert c.delete_alias(FunctionName=FN, Name="live")["ResponseMetadata"]["HTTPStatusCode"] == 204
    r = c.delete_function(FunctionName=FN)
    assert r["ResponseMetadata"]["HTTPStatusCode"] == 204
    with pytest.raises(ClientError) as e:
        c.get_function(FunctionName=FN)
    assert error_of(e)[:2] == ("ResourceNotFoundException", 404)
    assert FN not in [f["FunctionName"] for f in c.list_functions()["Functions"]]
