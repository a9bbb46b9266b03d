"""Starts a real Hearth Lambda API server for the suite and hands out boto3 clients, and builds
the `lambda_runtime` echo function (agent/tests/functions/echo) that invoke tests run.

The server command is `$HEARTH_SERVE_CMD` (for example `target/debug/hearth serve`) when set,
else `target/debug/hearth serve` when that binary has the subcommand, else the `serve` example built by `cargo build -p hearth-api --example serve` (looked up under
`$CARGO_TARGET_DIR`, `target-api/` and `target/`). A missing binary fails the suite loudly.
"""

import os
import shlex
import signal
import subprocess
import tempfile
import zipfile
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

KEY = "AKIDHEARTHPYTEST"
SECRET = "hearth-python-secret"
REGION = "us-east-1"
ACCOUNT = "000000000000"
ROLE = "arn:aws:iam::000000000000:role/lambda-role"
REPO = Path(__file__).resolve().parents[3]


def serve_command():
    if os.environ.get("HEARTH_SERVE_CMD"):
        return shlex.split(os.environ["HEARTH_SERVE_CMD"])
    hearth = REPO / "target/debug/hearth"
    if hearth.is_file() and subprocess.run([str(hearth), "serve", "--help"], capture_output=True).returncode == 0:
        return [str(hearth), "serve"]
    dirs = [os.environ.get("CARGO_TARGET_DIR"), REPO / "target-api", REPO / "target"]
    for d in dirs:
        if d and (Path(d) / "debug/examples/serve").is_file():
            return [str(Path(d) / "debug/examples/serve")]
    pytest.fail(
        "no server to test: build it with `cargo build -p hearth-api --example serve` "
        "or set HEARTH_SERVE_CMD (e.g. 'target/debug/hearth serve')",
        pytrace=False,
    )


class Server:
    def __init__(self, data_dir, creds):
        self.data_dir = data_dir
        self.creds = creds
        self.proc = None
        self.endpoint = None
        self.log = open(Path(data_dir).parent / "server.log", "ab")

    def start(self):
        cmd = serve_command() + [
            "--listen", "127.0.0.1:0",
            "--data-dir", str(self.data_dir),
            "--credentials", str(self.creds),
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("hearth-api listening on "):
            self.proc.kill()
            pytest.fail(f"server did not start: {line!r}; see {self.log.name}", pytrace=False)
        self.endpoint = "http://" + line.split()[-1]

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("server ignored SIGTERM for 20 s")
        self.proc = None

    def restart(self):
        self.stop()
        self.start()

    def client(self, key=KEY, secret=SECRET, validate=True, retries=1):
        return boto3.client(
            "lambda",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            config=Config(
                retries={"max_attempts": retries, "mode": "standard"},
                parameter_validation=validate,
                read_timeout=30,
            ),
        )


@pytest.fixture(scope="session")
def server():
    with tempfile.TemporaryDirectory(prefix="hearth-pytest-") as tmp:
        creds = Path(tmp) / "credentials"
        creds.write_text(f"# test keys\n{KEY} {SECRET}\n")
        srv = Server(Path(tmp) / "data", creds)
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()
            srv.log.close()


@pytest.fixture(scope="session")
def echo_zip():
    """Path of the echo function's zip: built (static, release) with cargo as the agent's Rust tests
    build it (`hearth_agent::testing::echo_zip`), into target/functions/echo.zip."""
    source = REPO / "agent/tests/functions/echo"
    target = REPO / "target/functions"
    env = dict(os.environ, RUSTFLAGS="-C target-feature=+crt-static", CARGO_TARGET_DIR=str(target))
    cargo = os.environ.get("CARGO", "cargo")
    build = subprocess.run([cargo, "build", "--release", "--quiet", "--target", "x86_64-unknown-linux-gnu"],
                           cwd=source, env=env)
    if build.returncode != 0:
        pytest.fail(f"building the echo function in {source} failed (exit {build.returncode})", pytrace=False)
    binary = (target / "x86_64-unknown-linux-gnu/release/bootstrap").read_bytes()
    path = target / "echo.zip"
    partial = target / f"echo.zip.pytest-{os.getpid()}"
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as z:
        info = zipfile.ZipInfo("bootstrap")
        info.external_attr = 0o755 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        z.writestr(info, binary)
    partial.rename(path)
    return path
