"""Invoke through `hearth serve` end to end: the API, the invoke-proxy socket, the agent and a real
container sandbox running the `lambda_runtime` echo function (agent/tests/functions/echo).

Needs what the server needs to run containers: root, and the static hearth-init.
"""

import base64
import io
import json
import threading
import zipfile

import pytest
from botocore.exceptions import ClientError

from conftest import ROLE

FN = "py-echo"
SLOW = "py-echo-slow"
BUSY = "py-echo-busy"


def wait_active(client, name):
    client.get_waiter("function_active_v2").wait(FunctionName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 30})


def wait_updated(client, name):
    client.get_waiter("function_updated_v2").wait(FunctionName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 30})


def invoke(client, name, payload, **kw):
    r = client.invoke(FunctionName=name, Payload=json.dumps(payload).encode(), **kw)
    r["Body"] = json.loads(r["Payload"].read())
    return r


def with_extra_file(zip_bytes, name, text):
    """The same code with one more file: new code, new CodeSha256."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item.filename))
        dst.writestr(name, text)
    return out.getvalue()


@pytest.fixture(scope="module")
def code(echo_zip):
    return echo_zip.read_bytes()


@pytest.fixture(scope="module", autouse=True)
def functions(server, code):
    c = server.client()
    for name, timeout in [(FN, 30), (SLOW, 1), (BUSY, 30)]:
        c.create_function(FunctionName=name, Runtime="provided.al2023", Role=ROLE, Handler="bootstrap",
                          Code={"ZipFile": code}, Timeout=timeout, MemorySize=256)
    for name in [FN, SLOW, BUSY]:
        wait_active(c, name)
    yield
    c = server.client()
    for name in [FN, SLOW, BUSY]:
        try:
            c.delete_function(FunctionName=name)
        except ClientError:
            pass


def test_invoke_echoes_the_payload(server):
    c = server.client()
    r = invoke(c, FN, {"op": "echo", "hello": "world"})
    assert r["StatusCode"] == 200
    assert r["Body"] == {"op": "echo", "hello": "world"}
    assert r["ExecutedVersion"] == "$LATEST"
    assert "FunctionError" not in r


def test_log_tail_has_a_report_line(server):
    c = server.client()
    r = invoke(c, FN, {"op": "log", "lines": 2}, LogType="Tail")
    log = base64.b64decode(r["LogResult"]).decode()
    assert "START RequestId: " in log, log
    assert "stdout line 1" in log and "stderr line 1" in log, log
    assert "REPORT RequestId: " in log and "Billed Duration" in log and "Memory Size: 256 MB" in log, log
    assert "LogResult" not in invoke(c, FN, {"op": "echo"})


def test_warm_invokes_reuse_the_environment(server):
    c = server.client()
    a = invoke(c, FN, {"op": "whoami"})["Body"]
    b = invoke(c, FN, {"op": "whoami"})["Body"]
    assert a["boot"] == b["boot"], (a, b)
    assert b["invokes"] == a["invokes"] + 1


def test_a_handled_error_is_a_function_error(server):
    c = server.client()
    r = invoke(c, FN, {"op": "error"})
    assert r["StatusCode"] == 200
    assert r["FunctionError"] == "Unhandled"
    assert r["Body"]["errorType"] == "EchoError"
    assert r["Body"]["errorMessage"] == "handled failure"
    # The environment is still good.
    assert invoke(c, FN, {"op": "echo", "after": "error"})["Body"]["after"] == "error"


def test_a_timeout_is_unhandled_and_the_next_invoke_works(server):
    c = server.client()
    before = invoke(c, SLOW, {"op": "whoami"})["Body"]
    r = invoke(c, SLOW, {"op": "sleep", "ms": 3000})
    assert r["StatusCode"] == 200
    assert r["FunctionError"] == "Unhandled"
    assert r["Body"]["errorType"] == "Sandbox.Timedout"
    assert "Task timed out after 1.00 seconds" in r["Body"]["errorMessage"]
    after = invoke(c, SLOW, {"op": "whoami"})
    assert "FunctionError" not in after
    assert after["Body"]["boot"] != before["boot"], "the timed-out environment was replaced"


def test_versions_aliases_and_a_code_update(server, code):
    c = server.client()
    v1 = c.publish_version(FunctionName=FN)["Version"]
    c.create_alias(FunctionName=FN, Name="live", FunctionVersion=v1)
    new_code = with_extra_file(code, "VERSION-2", "the second code")
    c.update_function_code(FunctionName=FN, ZipFile=new_code)
    wait_updated(c, FN)
    latest = invoke(c, FN, {"op": "whoami"})
    assert latest["ExecutedVersion"] == "$LATEST"
    assert "VERSION-2" in latest["Body"]["files"], latest["Body"]
    by_version = invoke(c, FN, {"op": "whoami"}, Qualifier=v1)
    assert by_version["ExecutedVersion"] == v1
    assert by_version["Body"]["version"] == v1
    assert "VERSION-2" not in by_version["Body"]["files"]
    by_alias = invoke(c, FN, {"op": "whoami"}, Qualifier="live")
    assert by_alias["ExecutedVersion"] == v1
    assert by_alias["Body"]["boot"] == by_version["Body"]["boot"], "the version's warm environment"
    c.update_function_configuration(FunctionName=FN, Environment={"Variables": {"ECHO_MARKER": "configured"}})
    wait_updated(c, FN)
    assert invoke(c, FN, {"op": "whoami"})["Body"]["marker"] == "configured"


def test_reserved_concurrency_zero_is_429(server):
    c = server.client()
    c.put_function_concurrency(FunctionName=BUSY, ReservedConcurrentExecutions=0)
    with pytest.raises(ClientError) as e:
        c.invoke(FunctionName=BUSY, Payload=b"{}")
    err = e.value.response
    assert err["Error"]["Code"] == "TooManyRequestsException"
    assert err["ResponseMetadata"]["HTTPStatusCode"] == 429
    assert err["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
    assert err["ResponseMetadata"]["HTTPHeaders"]["retry-after"] == "1"


def test_more_invokes_than_the_reservation_get_429(server):
    c = server.client()
    c.put_function_concurrency(FunctionName=BUSY, ReservedConcurrentExecutions=2)
    results = []

    def call():
        client = server.client()
        try:
            r = invoke(client, BUSY, {"op": "sleep", "ms": 2500})
            results.append(("ok", r["Body"]))
        except ClientError as e:
            results.append((e.response["Error"]["Code"], e.response.get("Reason")))

    threads = [threading.Thread(target=call) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r[0] == "ok"]
    throttled = [r for r in results if r[0] != "ok"]
    assert len(ok) == 2, results
    assert all(r == ("TooManyRequestsException", "ReservedFunctionConcurrentInvocationLimitExceeded")
               for r in throttled), results
    c.delete_function_concurrency(FunctionName=BUSY)
    assert invoke(c, BUSY, {"op": "echo", "n": 1})["Body"]["n"] == 1
