"""Parsing of the environment variables read in shardserve.distributed.env."""

from __future__ import annotations

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
    monkeypatch.setenv("SHARDSERVE_PP_LAYER_PARTITION", "16, 14")
    monkeypatch.setenv("SHARDSERVE_NUM_THREADS", "3")
    assert (env.host_ip(), env.base_port(), env.pp_layer_partition(), env.threads_override()) == (
        "10.0.0.7", 29500, [16, 14], 3)


@pytest.mark.parametrize(
    "name,value,call",
    [
        ("SHARDSERVE_PP_LAYER_PARTITION", "a,b", env.pp_layer_partition),
        ("SHARDSERVE_PP_LAYER_PARTITION", "3,", env.pp_layer_partition),
        ("SHARDSERVE_PP_LAYER_PARTITION", "3,0", env.pp_layer_partition),
        ("SHARDSERVE_PORT", "http", env.base_port),
        ("SHARDSERVE_PORT", "70000", env.base_port),
        ("SHARDSERVE_NUM_THREADS", "0", env.threads_override),
    ],
)
def test_bad_values_name_the_variable(monkeypatch, name, value, call):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.parametrize(
    "values,expected",
    [
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (1, 4, 1)),
        ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, (3, 4, 1)),
        ({"PMI_RANK": "2", "PMI_SIZE": "3"}, (2, 3, 2)),
    ],
)
def test_launcher_rank(monkeypatch, values, expected):
    for name in env.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    assert env.launcher_rank() == expected


def test_launcher_rank_out_of_range(monkeypatch):
    monkeypatch.setenv("RANK", "4")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="RANK"):
        env.launcher_rank()
