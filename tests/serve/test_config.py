"""Serve configuration: deployments that cannot work are refused at load with a one-line error;
evidence provider names are validated; simulated only when named."""

from __future__ import annotations

import pytest
import yaml

from bifrost.config import CONFIG_DIR
from bifrost.errors import BifrostError
from bifrost.serve.config import ServeConfig, load_serve_config


def test_default_config_loads_and_sizes_local_ray_to_the_replicas():
    scfg = load_serve_config()
    assert scfg.ray_address is None and scfg.ray_num_cpus is None
    assert scfg.local_ray_cpus == 1
    assert scfg.replace(replicas=3).local_ray_cpus == 3  # `bifrost serve --replicas 3` fits, no hang
    assert scfg.replace(replicas=3, replica_cpus=0.5).local_ray_cpus == 2


def test_ray_client_address_is_refused_with_the_alternative():
    with pytest.raises(BifrostError) as err:
        ServeConfig(ray_address="ray://head:10001", workers=("w:1",))
    assert "ray://" in str(err.value) and "ray_address: auto|host:port" in str(err.value)
    with pytest.raises(BifrostError, match="host:port"):
        ServeConfig(ray_address="http://head:6379", workers=("w:1",))


def test_cluster_needs_worker_addresses_and_the_ray_runtime():
    with pytest.raises(BifrostError) as err:
        ServeConfig(ray_address="auto")
    assert "workers" in str(err.value) and "127.0.0.1" in str(err.value)
    with pytest.raises(BifrostError, match="runtime: ray"):
        ServeConfig(ray_address="head:6379", workers=("w:1",), runtime="local")
    ok = ServeConfig(ray_address="head:6379", workers=("w1:5000", "w2:5000"), worker_certs=("a.pem", "b.pem"),
                     replicas=8)
    assert ok.replicas == 8  # a cluster's capacity is the cluster's: checked at startup (startup_timeout_s)


def test_local_ray_without_room_for_the_replicas_is_refused():
    with pytest.raises(BifrostError) as err:
        ServeConfig(replicas=3, ray_num_cpus=2)
    assert "3 Ray CPUs" in str(err.value) and "--ray-num-cpus" in str(err.value)
    assert ServeConfig(replicas=3, ray_num_cpus=2, replica_cpus=0.5).replicas == 3
    assert ServeConfig(replicas=3, ray_num_cpus=2, runtime="local").replicas == 3  # no Ray: nothing to schedule


@pytest.mark.parametrize("bad", [{"max_pending_sessions": 0}, {"pending_idle_s": 0}, {"replica_timeout_s": -1},
                                 {"startup_timeout_s": 0}, {"ray_num_cpus": 0}, {"nonsense": 1}, {"drain_s": -1},
                                 {"drain_s": 3601}])
def test_bad_values_are_refused(tmp_path, bad):
    p = tmp_path / "serve.yaml"
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(BifrostError):
        load_serve_config(p)


@pytest.mark.parametrize("argv, words", [
    (["--replicas", "3", "--ray-num-cpus", "2"], "ray_num_cpus"),
    (["--ray-address", "ray://head:10001", "--workers", "w:1"], "ray://"),
    (["--ray-address", "auto"], "workers"),
    (["--drain-s", "-5"], "serve.drain_s must be 0..3600"),
])
def test_serve_cli_refuses_unworkable_deployments_in_one_line(argv, words, tmp_path, capsys):
    from bifrost.cli import main

    code = main(["serve", "--run-dir", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("bifrost: error:") and words in err[0]


def test_default_evidence_provider_is_auto_not_simulated() -> None:
    assert ServeConfig().evidence_provider == "auto"


def test_shipped_config_names_simulated_explicitly() -> None:
    raw = yaml.safe_load((CONFIG_DIR / "serve.yaml").read_text())
    assert raw["evidence_provider"] == "simulated"
    assert load_serve_config().evidence_provider == "simulated"


def test_unknown_evidence_provider_is_refused() -> None:
    with pytest.raises(BifrostError) as exc:
        ServeConfig(evidence_provider="sgx")
    assert "evidence_provider" in str(exc.value) and "auto" in str(exc.value)


def test_issuer_policy_is_checked_at_load(tmp_path):
    with pytest.raises(BifrostError, match="serve.issuer_policy"):
        ServeConfig(issuer_policy=str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("allow_simulated: maybe\n")
    with pytest.raises(BifrostError, match="serve.issuer_policy"):
        ServeConfig(issuer_policy=str(bad))
    good = tmp_path / "good.yaml"
    good.write_text("allow_debug: false\n")
    assert ServeConfig(issuer_policy=str(good)).issuer_policy == str(good)


def test_every_worker_address_needs_its_pinned_certificate():
    with pytest.raises(BifrostError, match="worker_certs"):
        ServeConfig(workers=("w1:5000", "w2:5000"), worker_certs=("a.pem",))
