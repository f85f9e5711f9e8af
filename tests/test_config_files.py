"""The shipped configuration: secure defaults, and the container/secure variants derived from it
(multidet.tsconfig.derived: serve.py, the containers and the tests' servers)."""

from __future__ import annotations

import pytest

from helpers import ROOT, read_properties
from multidet.tsconfig import derived


def test_config_properties_secure_defaults():
    props = read_properties(ROOT / "config.properties")
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:"), key
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["enable_model_api"] == "false"
    assert props["disable_token_authorization"] == "true"  # documented choice: loopback only
    assert props["model_store"] == "model_store" and props["load_models"] == "all.mar"
    assert props["metrics_mode"] == "prometheus"
    assert int(props["max_request_size"]) == 16 * 2**20


def test_serve_derives_container_and_secure_configs():
    props = read_properties(ROOT / "config.properties")
    container = derived(props, secure=False, bind="0.0.0.0")
    assert container["inference_address"] == "http://0.0.0.0:8080"
    assert container["metrics_address"] == "http://0.0.0.0:8082"
    # the control APIs stay on loopback unless exposed: nothing outside the pod reaches them
    assert container["management_address"] == "http://127.0.0.1:8081"
    assert container["grpc_management_address"] == container["grpc_inference_address"] == "127.0.0.1"
    assert container["disable_token_authorization"] == "true"
    opened = derived(props, bind="0.0.0.0", expose=("inference", "management", "grpc_management"))
    assert opened["management_address"] == "http://0.0.0.0:8081" and opened["grpc_management_address"] == "0.0.0.0"
    with pytest.raises(ValueError, match="unknown API"):
        derived(props, bind="0.0.0.0", expose=("admin",))
    secure = derived(props, secure=True, bind=None)
    assert secure["disable_token_authorization"] == "false"
    assert secure["inference_address"] == props["inference_address"]
    assert props["inference_address"].startswith("http://127.0.0.1")  # the original is untouched


def test_gitignore_keeps_secrets_and_generated_files_out():
    ignored = (ROOT / ".gitignore").read_text().split()
    for entry in ("key_file.json", "logs/", ".venv/", "checkpoints/", "model_store/*.mar", "outputs/", "artifacts/"):
        assert entry in ignored, entry
