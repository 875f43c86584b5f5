"""Transport security on loopback: TLS and SuperNode authentication, real Flower processes.

Certificates and keys are made in the test (`fedlora.flower.certs`, the `cryptography` package):
a CA, a server certificate for 127.0.0.1/localhost, one EC P-384 key per SuperNode. The
SuperLink runs with `--ssl-*` and `--enable-supernode-auth`; the nodes' public keys are
registered with `flwr supernode register` before they start (Flower 1.41's CLI-managed node
authentication). Checked: a secure run gives the insecure run's result; a node with a key
nobody registered is refused and the run goes on without it; a client that was not given the
CA certificate cannot connect.
"""

from __future__ import annotations

import json

import pytest
import torch

flwr = pytest.importorskip("flwr")

from conftest import make_config, strip_times  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fedlora import prepare  # noqa: E402
from fedlora.fl.engine import Simulator  # noqa: E402
from fedlora.flower.certs import write_node_key, write_tls  # noqa: E402
from fedlora.flower.deploy import LocalDeployment  # noqa: E402
from fedlora.jsonio import read_jsonl  # noqa: E402

FLOWER_OVERRIDES = ("fl.eval_every=0", "eval.global_test=false")  # as tests/test_flower.py


def _final_adapter(out) -> dict[str, torch.Tensor]:
    """The run's global adapter under the simulator's key names (the run directory keeps it in
    PEFT format: `base_model.model.<module>.weight`)."""
    peft = out / "adapters" / "global" / "adapter_model.safetensors"
    if not peft.exists():  # the raw file of older run directories
        return load_file(str(out / "global_adapter.safetensors"))
    return {k[len("base_model.model."):-len(".weight")]: v for k, v in load_file(str(peft)).items()}


def test_certificates_verify_and_keys_load_as_flower_reads_them(tmp_path):
    """The server certificate chains to the CA for each loopback name (checked by
    `cryptography`'s own X.509 path validation, not by us) and for no other; the node key pair
    loads with the loaders Flower uses (`flwr supernode register`, `flower-supernode`); private
    keys are 0600."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
    from flwr.cli.supernode.register import try_load_public_key

    tls = write_tls(tmp_path / "certs")
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    policy = PolicyBuilder().store(Store([ca]))
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        assert policy.build_server_verifier(name).verify(server, [])[-1] == ca
    with pytest.raises(VerificationError):
        policy.build_server_verifier(x509.DNSName("coord.example.org")).verify(server, [])
    assert (tls.server_key.stat().st_mode & 0o777) == 0o600 == ((tmp_path / "certs" / "ca.key").stat().st_mode & 0o777)

    private, public = write_node_key(tmp_path / "keys", "node")
    assert try_load_public_key(public)  # Flower's bytes of a NIST-curve EC key, or it exits
    assert load_ssh_private_key(private.read_bytes(), None).public_key().public_numbers().curve.name == "secp384r1"
    assert (private.stat().st_mode & 0o777) == 0o600


@pytest.mark.flower
def test_secure_run_equals_insecure_and_refuses_an_unregistered_node(tmp_path):
    """TLS + node auth, 2 registered SuperNodes and 1 intruder (a valid key pair, never
    registered, claiming partition 0). Flower 1.41 refuses the intruder when it activates (HTTP
    412, "Failed to activate SuperNode": the SuperLink has no node with its public key), and the
    intruder's SuperNode exits; the run never sees it. The final adapter and every client row
    are the simulator's, which tests/test_flower.py shows are bitwise the insecure run's: TLS
    changes the transport, not one bit of the result."""
    cfg = make_config("partition.num_clients=2", *FLOWER_OVERRIDES, output_dir=tmp_path)
    intruder_key, _ = write_node_key(tmp_path / "intruder", "intruder")
    dep = LocalDeployment(cfg, tmp_path / "flower", round_timeout=120, secure=True)
    with dep:
        intruder = dep.start_node(0, name="intruder", private_key=intruder_key)
        out = dep.run_app(timeout=300)
        known = dep.nodes()
        intruder_code = intruder.wait(timeout=60)
    log = (tmp_path / "flower" / "logs" / "intruder.log").read_text()
    assert intruder_code not in (0, None) and "Failed to activate SuperNode" in log, log[-2000:]
    link_log = (tmp_path / "flower" / "logs" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in link_log
    assert sorted(known) == sorted(dep.registered.values())  # the intruder got no node id
    servers = [r for r in read_jsonl(out / "metrics.jsonl") if r["client"] == "server"]
    assert [s["replies"] for s in servers] == [2, 2] and not any(s.get("num_rejected") for s in servers)

    ref = Simulator(prepare(cfg), "fedit").run()
    got = _final_adapter(out)
    assert sorted(got) == sorted(ref.state.server)
    assert all(torch.equal(got[k], ref.state.server[k]) for k in got), "secure run differs"
    clients = [r for r in strip_times(read_jsonl(out / "metrics.jsonl")) if r["client"] != "server"]
    assert clients == [r for r in strip_times(ref.rows) if r["client"] != "server"]


@pytest.mark.flower
def test_client_without_the_root_certificate_cannot_connect(tmp_path):
    """A SuperNode with a registered key but no `--root-certificates` checks the server against
    the system's CAs, fails the TLS handshake (certificate verify failed) and exits. The `flwr`
    CLI without `root-certificates` fails too (Flower words it as "Connection to the SuperLink is
    unavailable"), while the same call with ca.crt, to the same address, works."""
    cfg = make_config("partition.num_clients=2", *FLOWER_OVERRIDES, output_dir=tmp_path)
    dep = LocalDeployment(cfg, tmp_path / "flower", num_nodes=0, secure=True)
    with dep:
        key, pub = write_node_key(tmp_path / "flower" / "keys", "no-ca")
        node_id = dep.register(pub)
        node = dep.start_node(0, name="no-ca", private_key=key, trust_ca=False)
        code = node.wait(timeout=90)
        home = tmp_path / "flower" / "flwr-home" / "config.toml"
        home.write_text(home.read_text() + f'\n[superlink.no-ca]\naddress = "127.0.0.1:{dep.port}"\n')
        untrusting = dep._flwr("supernode", "list", "no-ca", "--format", "json", timeout=90)
        known = dep.nodes()
    log = (tmp_path / "flower" / "logs" / "no-ca.log").read_text()
    assert code not in (0, None) and "certificate verify failed" in log.lower(), log[-2000:]
    assert known == {node_id: "registered"}  # registered, but it never came online
    refused = json.loads(untrusting.stdout)
    assert refused["success"] is False and "unavailable" in refused["error-message"], refused


@pytest.mark.flower
def test_cli_local_secure_end_to_end(tmp_path, capsys):
    """`fedlora flower local CONFIG --secure`, as a user runs it: certificates and node keys are
    made under --out, the run completes over TLS with every node authenticated, and the result
    is the simulator's."""
    from fedlora.cli import main

    cfg = make_config("partition.num_clients=2", *FLOWER_OVERRIDES, output_dir=tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(cfg.to_dict()))  # JSON is YAML
    assert main(["flower", "local", str(config), "--secure", "--out", str(tmp_path / "secure"),
                 "--timeout", "300"]) == 0
    printed = capsys.readouterr().out
    assert "TLS: CA and server certificate in" in printed and "2 keys registered" in printed
    assert (tmp_path / "secure" / "certs" / "ca.crt").exists() and len(list((tmp_path / "secure" / "keys").glob("*.pub"))) == 2
    ref = Simulator(prepare(cfg), "fedit").run()
    got = _final_adapter(tmp_path / "secure" / "output")
    assert all(torch.equal(got[k], ref.state.server[k]) for k in ref.state.server)
