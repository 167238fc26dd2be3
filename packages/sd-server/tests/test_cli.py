"""``sd-serve``'s flags: a bad one is one line on stderr and exit status 2, before any model
loads or any port is bound."""

from __future__ import annotations

import pytest

from sd_server.cli import is_loopback, main, parse_auth


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--api-auth", "alice"], "--api-auth entry 'alice' must be user:password"),
        (["--api-auth", "alice:secret,:x"], "must be user:password"),
        (["--port", "0"], "--port must be in 1..65535"),
        (["--queue-size", "-1"], "--queue-size must be at least 0"),
        (["--max-body-mb", "0"], "--max-body-mb must be positive"),
        (["--models-dir", "/no/such/folder"], "--models-dir /no/such/folder: no such folder"),
        (["--checkpoint", "/no/such/model.safetensors"], "no such checkpoint file"),
        (["--workers", "0"], "--workers must be at least 1, got 0"),
        (["--workers", "3", "--devices", "cpu,cpu"], "--workers 3 does not fit the 2 --devices"),
        (["--devices", "cpu,gpu0"], "--devices: 'gpu0' is not a device"),
        (["--workers", "2", "--worker-threads", "0"], "--worker-threads must be at least 1"),
    ],
)
def test_bad_flags(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sd-serve: error: ") and message in err[0]
    assert "Traceback" not in err[0]


def test_parse_auth_and_loopback():
    assert parse_auth("a:b,c:d:e") == [("a", "b"), ("c", "d:e")]
    assert parse_auth(None) == []
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
