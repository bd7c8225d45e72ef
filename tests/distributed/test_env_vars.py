"""Parsing of the environment variables in shardserve.distributed.env."""

import pytest

from shardserve.distributed import env


def test_defaults(monkeypatch):
    for name in env.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert env.host_ip() == "127.0.0.1"
    assert env.base_port() is None
    assert env.pp_layer_partition() is None
    assert env.threads_override() is None
    assert env.launcher_rank() is None


def test_values(monkeypatch):
    monkeypatch.setenv("SHARDSERVE_HOST_IP", "10.0.0.7")
    monkeypatch.setenv("SHARDSERVE_PORT", "29500")
    monkeypatch.setenv("SHARDSERVE_PP_LAYER_PARTITION", " 16, 14 ")
    monkeypatch.setenv("SHARDSERVE_NUM_THREADS", "3")
    assert env.host_ip() == "10.0.0.7"
    assert env.base_port() == 29500
    assert env.pp_layer_partition() == [16, 14]
    assert env.threads_override() == 3


@pytest.mark.parametrize("value", ["16;14", "a,b", "16,,14", "3.5", "2,0"])
def test_bad_partition(monkeypatch, value):
    monkeypatch.setenv("SHARDSERVE_PP_LAYER_PARTITION", value)
    with pytest.raises(ValueError, match="16,14"):
        env.pp_layer_partition()


@pytest.mark.parametrize("name,value,getter", [
    ("SHARDSERVE_PORT", "http", env.base_port),
    ("SHARDSERVE_PORT", "70000", env.base_port),
    ("SHARDSERVE_NUM_THREADS", "0", env.threads_override),
    ("SHARDSERVE_NUM_THREADS", "two", env.threads_override),
])
def test_bad_ints(monkeypatch, name, value, getter):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        getter()


def test_launchers(monkeypatch):
    for name in env.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    assert env.launcher_rank() == (3, 4, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert env.launcher_rank() == (2, 4, 2)  # torchrun wins; LOCAL_RANK unset -> rank
    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("PMI_RANK", "5")
    monkeypatch.setenv("PMI_SIZE", "4")
    with pytest.raises(ValueError, match="PMI_RANK"):
        env.launcher_rank()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("level,shown", [(None, True), ("warning", False), ("DEBUG", True)])
def test_logging_level_decides_what_reaches_stderr(level, shown):
    """shardserve's INFO lines (the start-up facts) reach stderr by default; SHARDSERVE_LOGGING_LEVEL filters them."""
    import os
    import subprocess
    import sys

    child_env = {k: v for k, v in os.environ.items() if k != "SHARDSERVE_LOGGING_LEVEL"}
    if level:
        child_env["SHARDSERVE_LOGGING_LEVEL"] = level
    code = "import logging, shardserve; logging.getLogger('shardserve.x').info('start-up fact')"
    proc = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert ("start-up fact" in proc.stderr) == shown, proc.stderr


def test_bad_logging_level(monkeypatch):
    monkeypatch.setenv("SHARDSERVE_LOGGING_LEVEL", "LOUD")
    with pytest.raises(ValueError, match="SHARDSERVE_LOGGING_LEVEL"):
        env.logging_level()


def test_tp_transport_and_collectives_port(monkeypatch):
    monkeypatch.delenv("SHARDSERVE_TP_TRANSPORT", raising=False)
    monkeypatch.delenv("SHARDSERVE_COLLECTIVES_PORT", raising=False)
    assert env.tp_transport() == "auto" and env.collectives_port() is None
    monkeypatch.setenv("SHARDSERVE_TP_TRANSPORT", " Gloo ")
    monkeypatch.setenv("SHARDSERVE_COLLECTIVES_PORT", "29800")
    assert env.tp_transport() == "gloo" and env.collectives_port() == 29800
    monkeypatch.setenv("SHARDSERVE_TP_TRANSPORT", "mpi")
    with pytest.raises(ValueError, match="SHARDSERVE_TP_TRANSPORT='mpi': expected 'auto' or 'gloo'"):
        env.tp_transport()
    monkeypatch.setenv("SHARDSERVE_COLLECTIVES_PORT", "70000")
    with pytest.raises(ValueError, match="expected a port number"):
        env.collectives_port()
